"""analyze_weights: every metric against NumPy, the views, the sources and bad input."""

import json
import math
import weakref

import numpy as np
import pytest
import torch
from torch import nn

from hypothesis import example, given, settings
from hypothesis import strategies as st

from svdkit.analysis.esd import eigenvalues
from svdkit.analysis.powerlaw import fit_power_law
from svdkit.analysis.weights import analyze_weights
from svdkit.linalg import compression_suitability

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 24))
    with torch.no_grad():  # a rank-deficient layer exercises the rank tolerance
        model[4].weight[:, 20:] = 0
    return model


def test_metrics_match_numpy():
    model = _mlp()
    table = analyze_weights(model, workers=1)
    assert table.names == ["0", "2", "4"] and set(table.column("route")) == {"gram"}  # tiny: the float64 Gram
    for record in table:
        W = model.get_submodule(record["name"]).weight.detach().double().numpy()
        s = np.linalg.svd(W, compute_uv=False)
        lam = s**2
        eps = np.finfo(np.float32).eps
        assert record["rank_tolerance"] == max(W.shape) * eps
        assert record["rank"] == np.linalg.matrix_rank(W, tol=max(W.shape) * eps * s[0])
        assert record["sigma_max"] == pytest.approx(s[0], rel=1e-9)
        assert record["sigma_min"] == pytest.approx(s[-1], rel=1e-5, abs=1e-6 * s[0])
        assert record["frobenius_norm"] == pytest.approx(np.linalg.norm(W), rel=1e-12)
        assert record["nuclear_norm"] == pytest.approx(np.linalg.norm(W, "nuc"), rel=1e-6)
        # WeightWatcher's names, WeightWatcher's meaning: squared norms.
        assert record["spectral_norm"] == pytest.approx(np.linalg.norm(W, 2) ** 2, rel=1e-9)
        assert record["norm"] == pytest.approx(np.linalg.norm(W) ** 2, rel=1e-12)
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
        # The verdict: svdkit's one rule, relative error <= 0.2 by default.
        tails = np.sqrt(np.maximum(1 - cum, 0))
        k = int(np.argmax(tails <= 0.2 + 1e-12)) + 1
        m, n = W.shape
        assert record["verdict_rank"] == k
        assert record["verdict_params"] == pytest.approx(k * (m + n) / (m * n))
        expected = "compress" if k * (m + n) <= 0.5 * m * n else "marginal" if k * (m + n) < m * n else "keep_dense"
        assert record["verdict"] == expected == compression_suitability(s, (m, n)).verdict
    assert table["4"]["rank"] == 20
    assert table.meta["verdict_rule"].startswith("factorize at the smallest rank whose relative Frobenius error is <= 0.2")


@settings(max_examples=25, deadline=None)
@example(m=27, n=32, rank=27, dtype=torch.float32, method="auto", seed=1254, small_gram32=True)  # 1.008x the threshold, zeroed
@given(
    m=st.integers(1, 90), n=st.integers(1, 90), rank=st.integers(0, 90),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    method=st.sampled_from(["auto", "gram", "svd"]), seed=st.integers(0, 2**16), small_gram32=st.booleans(),
)
def test_any_shape_dtype_and_route_against_numpy(m, n, rank, dtype, method, seed, small_gram32):
    """Invariants that hold for every matrix: eigenvalues within the route's resolution, the rank
    counted at the reported tolerance, sigma_min NaN only where it is not resolved. The float32
    Gram route is forced onto small matrices half of the time (it is chosen for large ones)."""
    from unittest import mock

    import svdkit.analysis.esd as esd

    with mock.patch.object(esd, "GRAM32_MIN_FLOPS", 0 if small_gram32 else esd.GRAM32_MIN_FLOPS):
        _check_against_numpy(m, n, rank, dtype, method, seed)


def _check_against_numpy(m, n, rank, dtype, method, seed):
    import svdkit.analysis.esd as esd

    g = torch.Generator().manual_seed(seed)
    k = min(rank, m, n)
    W = (torch.randn(m, k, generator=g) @ torch.randn(k, n, generator=g) if k else torch.zeros(m, n)) + 1e-3 * torch.randn(m, n, generator=g)
    W = W.to(dtype)
    record = analyze_weights({"w": W}, eigen_route=method)[0]
    s = np.linalg.svd(W.double().numpy(), compute_uv=False)
    route = record["route"]
    assert route == ("svd" if method == "svd" or (method == "auto" and dtype == torch.float64) else "gram" if method == "gram" or m * n * min(m, n) < esd.GRAM32_MIN_FLOPS else "gram32")
    resolution = 1e-6 if route == "gram32" else 1e-13
    lam = analyze_weights({"w": W}, eigen_route=method).spectrum(0)
    assert lam.shape == (min(m, n),) and (np.diff(lam) <= 0).all() and (lam >= 0).all()
    zeroed = (lam == 0) & (route == "gram32")  # gram32 reports what it computes below its resolution as 0
    np.testing.assert_allclose(lam[~zeroed], (s**2)[~zeroed], atol=resolution * s[0] ** 2 + 1e-300)
    # a value reported as 0 was computed below the threshold: it is at most the threshold plus that rounding
    assert (s[zeroed] ** 2 <= 2 * resolution * s[0] ** 2).all()
    # Each eigenvalue is resolved to `resolution * lambda_max`, so their sum / lambda_max to min(m, n) times that.
    assert record["stable_rank"] == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-6, abs=min(m, n) * resolution)
    tol = record["rank_tolerance"] * s[0]
    clear = np.abs(s - tol) > 1e-3 * s[0]  # values right at the tolerance may go either way
    if clear.all():
        assert record["rank"] == int((s > tol).sum())
    if math.isnan(record["sigma_min"]):
        assert route == "gram32" and s[-1] ** 2 <= 1e-4 * s[0] ** 2
    else:
        assert record["sigma_min"] == pytest.approx(s[-1], abs=math.sqrt(resolution) * s[0])


def test_the_float32_gram_route_on_a_large_low_rank_matrix():
    """Rounding noise of the float32 Gram is never counted as rank; an unresolved sigma_min is NaN."""
    torch.manual_seed(6)
    W = torch.randn(1100, 40) @ torch.randn(40, 1000)  # rank 40, big enough for the float32 Gram
    fast, exact = analyze_weights({"w": W})[0], analyze_weights({"w": W}, eigen_route="gram")[0]
    assert fast["route"] == "gram32" and exact["route"] == "gram"
    assert fast["rank"] == exact["rank"] == 40
    assert fast["rank_tolerance"] == pytest.approx(1e-3) and exact["rank_tolerance"] == pytest.approx(1100 * 2**-23)
    assert math.isnan(fast["sigma_min"]) and math.isnan(fast["condition_number"])
    assert exact["sigma_min"] < 1e-3 * exact["sigma_max"]
    for key in ("alpha", "stable_rank", "log_norm", "log_spectral_norm", "effective_rank", "nuclear_norm", "verdict_rank"):
        assert fast[key] == pytest.approx(exact[key], rel=1e-4), key


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


def test_tied_weights_are_computed_once_and_listed_under_every_name(monkeypatch):
    emb = nn.Embedding(30, 8)
    head = nn.Linear(8, 30, bias=False)
    head.weight = emb.weight
    import svdkit.analysis.weights as weights

    calls = []
    real = weights.eigenvalues
    monkeypatch.setattr(weights, "eigenvalues", lambda W, method: calls.append(tuple(W.shape)) or real(W, method))
    table = analyze_weights(nn.ModuleDict({"emb": emb, "head": head}))
    assert table.names == ["emb", "head"] and calls == [(30, 8)] and not table.skipped
    assert table["head"]["tied_to"] == "emb" and table["head"]["kind"] == "linear" and "tied_to" not in table["emb"]
    assert {k: v for k, v in table["head"].items() if k not in ("name", "kind", "tied_to")} == {
        k: v for k, v in table["emb"].items() if k not in ("name", "kind")}


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
    with pytest.raises(ValueError, match="eigen_route must be one of 'auto', 'gram', 'svd', got 'fast'"):
        analyze_weights(_mlp(), eigen_route="fast")
    with pytest.raises(ValueError, match=r"error must be in \[0, 1\), got 1.5"):
        analyze_weights(_mlp(), error=1.5)
    with pytest.raises(ValueError, match=r"target_modules=\['attention'\].*match no weight.*names look like: 0, 1, 2"):
        analyze_weights(_mlp(), target_modules=["attention"])
    with pytest.raises(ValueError, match="calibration= needs a model"):
        analyze_weights({"w": torch.randn(4, 4)}, calibration=[torch.randn(2, 4)])


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
    from svdkit.checkpoint import Checkpoint

    real_read = Checkpoint.tensor

    def tracking_read(self, key, **kwargs):
        peak.append(sum(ref() is not None for ref in alive))
        tensor = real_read(self, key, **kwargs)
        alive.append(weakref.ref(tensor))
        return tensor

    monkeypatch.setattr(Checkpoint, "tensor", tracking_read)
    table = analyze_weights(path)
    assert table.names == [f"layer{i}" for i in range(5)]
    assert max(peak) == 0, "a tensor read earlier was still alive when the next was read"
    assert table.skipped == [("layer0.bias", "1-D tensor of shape (48,): only 2-D matrices and 4-D Conv2d kernels are analysed")]
    assert table.meta["streamed"] and table.meta["workers"] == 1
    direct = analyze_weights({k: v for k, v in state.items() if v.ndim == 2})
    assert table.column("alpha") == pytest.approx(direct.column("alpha"))
    # A directory of shards reads the same way.
    assert analyze_weights(tmp_path).names == table.names


def _sharded(tmp_path, shards=3):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(8)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        state = {f"layers.{s}.{p}.weight": torch.randn(24, 16) for p in ("q", "k")}
        safetensors_torch.save_file(state, str(tmp_path / name))
        weight_map.update({key: name for key in state})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def test_sharded_checkpoint_reads_the_shards_its_index_names(tmp_path):
    weight_map = _sharded(tmp_path)
    (tmp_path / "stray.safetensors").write_bytes(b"not a shard of this checkpoint")
    table = analyze_weights(tmp_path)
    assert sorted(table.names) == sorted(k[: -len(".weight")] for k in weight_map)


def test_sharded_checkpoint_with_missing_shards_names_every_one(tmp_path):
    _sharded(tmp_path, shards=4)
    (tmp_path / "model-00002-of-00004.safetensors").unlink()
    (tmp_path / "model-00004-of-00004.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=(
            r"model.safetensors.index.json in .* names 4 shards, 2 of them missing: "
            r"model-00002-of-00004.safetensors \(2 tensors\), model-00004-of-00004.safetensors \(2 tensors\); reading it would be partial")):
        analyze_weights(tmp_path)


def test_sharded_checkpoint_with_an_incomplete_shard_or_a_bad_index(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    weight_map = _sharded(tmp_path, shards=2)
    safetensors_torch.save_file({"layers.0.q.weight": torch.randn(24, 16)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    with pytest.raises(ValueError, match=r"model-00001-of-00002.safetensors lacks 1 tensor\(s\) that the index places there: layers.0.k.weight"):
        analyze_weights(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read the shard index"):
        analyze_weights(tmp_path)
    assert len(weight_map) == 4


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
    assert all(table.column("ww_eligible"))
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
