"""analyze_weights: every metric against NumPy, the views, the sources and bad input."""

import math
import weakref

import numpy as np
import pytest
import torch
from torch import nn

from svdkit.analysis import sources
from svdkit.analysis.esd import eigenvalues
from svdkit.analysis.powerlaw import fit_power_law
from svdkit.analysis.weights import analyze_weights


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 24))
    with torch.no_grad():  # a rank-deficient layer exercises the rank tolerance
        model[4].weight[:, 20:] = 0
    return model


def test_metrics_match_numpy():
    model = _mlp()
    table = analyze_weights(model, workers=1)
    assert table.names == ["0", "2", "4"]
    for record in table:
        W = model.get_submodule(record["name"]).weight.detach().double().numpy()
        s = np.linalg.svd(W, compute_uv=False)
        lam = s**2
        eps = np.finfo(np.float32).eps
        assert record["rank"] == np.linalg.matrix_rank(W, tol=max(W.shape) * eps * s[0])
        assert record["sigma_max"] == pytest.approx(s[0], rel=1e-9)
        assert record["sigma_min"] == pytest.approx(s[-1], rel=1e-5, abs=1e-6 * s[0])
        assert record["frobenius_norm"] == pytest.approx(np.linalg.norm(W), rel=1e-12)
        assert record["spectral_norm"] == pytest.approx(np.linalg.norm(W, 2), rel=1e-9)
        assert record["nuclear_norm"] == pytest.approx(np.linalg.norm(W, "nuc"), rel=1e-6)
        assert record["log10_frobenius_norm"] == pytest.approx(math.log10(np.linalg.norm(W)), rel=1e-12)
        assert record["stable_rank"] == pytest.approx(lam.sum() / lam[0], rel=1e-9)
        p = s / s.sum()
        p = p[p > 1e-12]
        assert record["effective_rank"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-6)
        assert record["top10_energy"] == pytest.approx(lam[:10].sum() / lam.sum(), rel=1e-9)
        cum = np.cumsum(lam) / lam.sum()
        assert record["rank_90"] == int(np.argmax(cum >= 0.9)) + 1
        assert record["rank_99"] == int(np.argmax(cum >= 0.99 - 1e-15)) + 1
        assert record["rank_90_fraction"] == record["rank_90"] / min(W.shape)
        assert record["log_norm"] == pytest.approx(math.log10(lam.sum()), rel=1e-12)
        assert record["log_spectral_norm"] == pytest.approx(math.log10(lam[0]), rel=1e-9)
        fit = fit_power_law(lam)
        assert record["alpha"] == pytest.approx(fit.alpha, rel=1e-6)
        assert record["alpha_weighted"] == pytest.approx(fit.alpha * math.log10(lam[0]), rel=1e-6)
        assert record["log_alpha_norm"] == pytest.approx(math.log10(np.sum(lam[lam > 0] ** fit.alpha)), rel=1e-6)
        tails = np.sqrt(np.maximum(1 - cum, 0))
        k = int(np.argmax(tails <= 0.05 + 1e-12)) + 1
        assert record["tol_rank"] == k
        m, n = W.shape
        assert record["tol_param_saving"] == pytest.approx(1 - k * (m + n) / (m * n))
    assert table["4"]["rank"] == 20


def test_gram_and_svd_routes_agree():
    torch.manual_seed(1)
    W = torch.randn(3, 50, 30)
    lam_gram = eigenvalues(W, "gram")
    lam_svd = eigenvalues(W, "svd")
    assert lam_gram.dtype == torch.float64 and lam_gram.shape == (3, 30)
    torch.testing.assert_close(lam_gram, lam_svd, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(eigenvalues(W.mT), lam_svd, rtol=1e-9, atol=1e-12)
    assert bool((lam_gram[:, :-1] >= lam_gram[:, 1:]).all())


def test_conv2d_both_views():
    torch.manual_seed(2)
    conv = nn.Conv2d(6, 10, kernel_size=3)
    table = analyze_weights(nn.Sequential(conv), conv2d="both")
    matrix, slices = table.records
    assert (matrix["view"], slices["view"]) == ("matrix", "slices")
    W = conv.weight.detach().double()
    s = np.linalg.svd(W.reshape(10, -1).numpy(), compute_uv=False)
    assert matrix["stable_rank"] == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-9)
    assert (matrix["rows"], matrix["cols"]) == (10, 54)
    # WeightWatcher: the 9 slices W[:, :, i, j], scaled by sqrt(1/2), eigenvalues pooled.
    pooled = np.sort(np.concatenate([np.linalg.svd(W[:, :, i, j].numpy(), compute_uv=False) ** 2 / 2 for i in range(3) for j in range(3)]))
    np.testing.assert_allclose(np.sort(table.spectrum(1)), pooled, rtol=1e-9)
    assert slices["num_evals"] == 54
    assert slices["log_norm"] == pytest.approx(math.log10(pooled.sum()), rel=1e-12)
    assert slices["alpha"] == pytest.approx(fit_power_law(pooled).alpha, rel=1e-9)
    assert "verdict" not in slices


def test_transformers_conv1d_is_read_transposed():
    transformers = pytest.importorskip("transformers")
    conv = transformers.pytorch_utils.Conv1D(12, 20)  # weight (20, 12): in x out
    record = analyze_weights(nn.Sequential(conv))[0]
    assert record["kind"] == "conv1d" and (record["rows"], record["cols"]) == (12, 20)


def test_half_precision_weights():
    torch.manual_seed(7)
    W = torch.randn(64, 48)
    full = analyze_weights({"w": W})[0]
    for dtype in (torch.bfloat16, torch.float16):
        half = analyze_weights({"w": W.to(dtype)})[0]
        assert half["dtype"] == str(dtype).replace("torch.", "") and half["rank"] == 48
        assert half["stable_rank"] == pytest.approx(full["stable_rank"], rel=0.02)


def test_tied_weights_are_analysed_once():
    emb = nn.Embedding(30, 8)
    head = nn.Linear(8, 30, bias=False)
    head.weight = emb.weight
    table = analyze_weights(nn.ModuleDict({"emb": emb, "head": head}))
    assert table.names == ["emb"]
    assert table.skipped == [("head", "shares its weight with emb")]


def test_state_dict_skips_what_is_not_a_matrix():
    torch.manual_seed(3)
    state = {
        "a.weight": torch.randn(16, 12), "a.bias": torch.randn(16), "conv.weight": torch.randn(4, 3, 3, 3),
        "odd": torch.randn(2, 3, 4), "ids": torch.arange(12).reshape(3, 4), "scalar": torch.tensor(1.0),
    }
    table = analyze_weights(state, conv2d="slices")
    assert table.names == ["a", "conv"]
    reasons = dict(table.skipped)
    assert set(reasons) == {"a.bias", "odd", "ids", "scalar"}
    assert "1-D" in reasons["a.bias"] and "3-D" in reasons["odd"] and "floating" in reasons["ids"]


def test_nan_weights_are_a_reported_skip():
    state = {"good": torch.randn(10, 8), "bad": torch.randn(10, 8)}
    state["bad"][2, 3] = float("nan")
    table = analyze_weights(state)
    assert table.names == ["good"]
    (name, reason), = table.skipped
    assert name == "bad" and "bad" in reason and "1 NaN" in reason


def test_nothing_to_analyse_is_an_error():
    with pytest.raises(ValueError, match="no analysable layers"):
        analyze_weights(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)))
    with pytest.raises(ValueError, match="no analysable layers.*1-D"):
        analyze_weights({"bias": torch.zeros(3)})
    with pytest.raises(TypeError, match="cannot analyse a int"):
        analyze_weights(3)
    with pytest.raises(ValueError, match="conv2d"):
        analyze_weights(_mlp(), conv2d="pooled")


def test_synthetic_power_law_spectrum_recovers_alpha():
    torch.manual_seed(4)
    n, alpha = 300, 3.0
    # Eigenvalues at the quantiles of p(x) ~ x^-alpha, x >= 1, built into W = U diag(s) V^T.
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    lam = (1 - q) ** (-1 / (alpha - 1))
    U, _ = torch.linalg.qr(torch.randn(450, n, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    W = ((U * lam.sqrt()) @ V.T).float()
    record = analyze_weights({"w": W})[0]
    assert record["alpha"] == pytest.approx(alpha, abs=0.1)


def test_safetensors_streams_one_tensor_at_a_time(tmp_path, monkeypatch):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(5)
    state = {f"layer{i}.weight": torch.randn(48, 32) for i in range(5)}
    state["layer0.bias"] = torch.randn(48)
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(state, str(path))
    alive: list[weakref.ref] = []
    peak = []
    real_read = sources._read

    def tracking_read(handle, key, file):
        peak.append(sum(ref() is not None for ref in alive))
        tensor = real_read(handle, key, file)
        alive.append(weakref.ref(tensor))
        return tensor

    monkeypatch.setattr(sources, "_read", tracking_read)
    table = analyze_weights(path)
    assert table.names == [f"layer{i}" for i in range(5)]
    assert max(peak) == 0, "a tensor read earlier was still alive when the next was read"
    assert table.skipped == [("layer0.bias", "1-D tensor of shape (48,): only 2-D matrices and 4-D Conv2d kernels are analysed")]
    assert table.meta["streamed"] and table.meta["workers"] == 1
    direct = analyze_weights({k: v for k, v in state.items() if v.ndim == 2})
    assert table.column("alpha") == pytest.approx(direct.column("alpha"))
    # A directory of shards reads the same way.
    assert analyze_weights(tmp_path).names == table.names


def test_unreadable_or_missing_files_fail_clearly(tmp_path):
    pytest.importorskip("safetensors")
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    with pytest.raises(ValueError, match="broken.safetensors"):
        analyze_weights(bad)
    with pytest.raises(FileNotFoundError):
        analyze_weights(tmp_path / "missing.safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no .safetensors"):
        analyze_weights(empty)


def test_table_conversions(tmp_path):
    table = analyze_weights(_mlp(), mp_fit=True)
    summary = table.summary()
    assert summary["alpha"] == pytest.approx(np.mean(table.column("alpha")))
    assert {"stable_rank", "mp_softrank", "log_norm"} <= set(summary)
    csv_text = table.to_csv(tmp_path / "t.csv")
    assert csv_text.splitlines()[0].startswith("name,kind,view,shape")
    lines = csv_text.splitlines()
    assert len(lines) == 5 and lines[-1].startswith("(mean),")
    assert len(table.to_csv(summary=False).splitlines()) == 4
    data = __import__("json").loads(table.to_json(tmp_path / "t.json"))
    assert [r["name"] for r in data["layers"]] == ["0", "2", "4"]
    pd = pytest.importorskip("pandas")
    frame = table.to_pandas()
    assert isinstance(frame, pd.DataFrame) and list(frame["name"]) == ["0", "2", "4"]
    with pytest.raises(KeyError, match="no layer named"):
        table["nope"]


def test_parallel_workers_and_stacked_batches_give_the_same_table():
    model = nn.Sequential(_mlp(), nn.Linear(24, 24), nn.Linear(24, 24))
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")  # a bad matrix inside a stacked batch is found and skipped
    one = analyze_weights(model, workers=1)
    two = analyze_weights(model, workers=2)
    stacked = analyze_weights(model, stack=True)
    assert stacked.meta["stacked"] and not one.meta["stacked"]
    assert one.to_records() == two.to_records()
    assert [r["name"] for r in stacked] == one.names == ["0.0", "0.2", "0.4", "1"]
    for a, b in zip(one, stacked):
        assert a["alpha"] == pytest.approx(b["alpha"], rel=1e-9)
        assert a["stable_rank"] == pytest.approx(b["stable_rank"], rel=1e-12)
    assert [n for n, _ in stacked.skipped] == ["2"] and "NaN" in stacked.skipped[0][1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_tensors_are_analysed_on_the_gpu():
    model = _mlp()
    cpu = analyze_weights(model)
    gpu = analyze_weights(model.cuda())
    for a, b in zip(cpu, gpu):
        assert a["alpha"] == pytest.approx(b["alpha"], rel=1e-6)
        assert a["stable_rank"] == pytest.approx(b["stable_rank"], rel=1e-9)
