"""compress(): methods, rank choice, global budget, refit, report, save/load and errors."""

from __future__ import annotations

import copy
import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn

from svdkit.compression import CompressConfig, compress, decompress, load_compressed, save_compressed
from svdkit.linalg import cholesky_factor
from svdkit.layers import LowRankConv2d, LowRankLinear
from svdkit.linalg import Energy, ParamRatio, allocate_ranks


def mlp(seed: int = 0, width: int = 48) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 16))


def correlated_batches(seed: int = 1, n: int = 8, dim: int = 24) -> list[torch.Tensor]:
    """Inputs with a strongly non-isotropic covariance, so whitening matters."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) * torch.logspace(0, -2, dim).unsqueeze(0)
    return [torch.randn(32, dim, generator=g) @ mix.T for _ in range(n)]


def cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1, dilation=2), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 5 * 5, 10),
    )


# --- the invariants ---------------------------------------------------------------------------


def test_input_model_is_unchanged_and_layers_are_replaced():
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    out, report = compress(model, CompressConfig(method="svd", rank=4))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert all(isinstance(m, nn.Linear) for m in model if not isinstance(m, nn.GELU))
    assert isinstance(out[0], LowRankLinear) and out[0].rank == 4
    assert [row.rank for row in report.layers] == [4, 4, 4]
    assert report.layers[0].params_after == 4 * (24 + 48)


def test_inplace_modifies_the_given_model():
    model = mlp()
    out, _ = compress(model, CompressConfig(method="svd", rank=3), inplace=True)
    assert out is model and isinstance(model[2], LowRankLinear)


def test_rank_r_weight_is_recovered_exactly():
    model = mlp()
    with torch.no_grad():
        W = torch.randn(48, 5) @ torch.randn(5, 48)
        model[2].weight.copy_(W)
    out, report = compress(model, CompressConfig(method="svd", rank=5, target_modules=["2"]))
    x = torch.randn(10, 24)
    torch.testing.assert_close(out(x), model(x), rtol=1e-4, atol=1e-5)
    assert report.layers[0].predicted_error == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("rank", [2, 6, 12])
def test_whiten_output_error_never_worse_than_svd_on_calibration_data(seed, rank):
    model = mlp(seed)
    batches = correlated_batches(seed + 10)
    X = torch.cat(batches)
    errors = {}
    for method in ("svd", "whiten"):
        out, _ = compress(model, CompressConfig(method=method, rank=rank, target_modules=["0"]), batches)
        errors[method] = (out[0](X) - model[0](X)).norm().item()
    assert errors["whiten"] <= errors["svd"] * (1 + 1e-6)


def test_whiten_predicted_error_is_the_calibration_output_error():
    model = mlp()
    batches = correlated_batches()
    X = torch.cat(batches)
    out, report = compress(model, CompressConfig(method="whiten", rank=6, target_modules=["0"], damping=1e-10), batches)
    W = model[0].weight.double()
    actual = ((out[0].dense_weight().double() - W) @ X.double().T).norm() / (W @ X.double().T).norm()
    assert report.layers[0].predicted_error == pytest.approx(actual.item(), rel=1e-3)


class _DeadBranch(nn.Module):
    """``dead``'s output reaches the model's output multiplied by zero: the output does not depend on it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.dead, self.b = nn.Linear(24, 48), nn.Linear(48, 48), nn.Linear(48, 16)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.a(x))
        return self.b(h + 0.0 * self.dead(h))


def test_asvd_scales_by_the_inputs_and_lowers_the_output_error_of_outlier_channels():
    """ASVD's effect, not its label: on inputs with a few large channels (as LLM activations have),
    scaling by mean|x|**asvd_alpha keeps what those channels need, so the layer's output error on the
    data is lower than plain SVD's at the same rank; with asvd_alpha=0 it is plain SVD exactly."""
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(32, 32))
    g = torch.Generator().manual_seed(3)
    scale = torch.ones(32)
    scale[:3] = 30.0
    batches = [torch.randn(64, 32, generator=g) * scale for _ in range(4)]
    X = torch.cat(batches)
    errors = {}
    for method, alpha in (("svd", 0.5), ("asvd", 0.5), ("asvd", 0.0)):
        out, report = compress(layer, CompressConfig(method=method, rank=6, asvd_alpha=alpha), batches)
        assert {row.method for row in report.layers} == {method}
        errors[method, alpha] = (out(X) - layer(X)).norm().item()
    assert errors["asvd", 0.5] < 0.8 * errors["svd", 0.5]
    assert errors["asvd", 0.0] == pytest.approx(errors["svd", 0.5], rel=1e-5)


def test_fisher_without_output_dependence_is_flagged():
    batches = correlated_batches()
    _, report = compress(_DeadBranch(), CompressConfig(method="fisher", rank=5), batches)
    rows = {row.name: row for row in report.layers}
    assert rows["a"].method == rows["b"].method == "fisher" and not rows["a"].skip_reason
    assert rows["dead"].method == "whiten" and "does not depend on this layer" in rows["dead"].skip_reason
    # A budget spends nothing on it beyond the smallest rank: its errors cost the output nothing.
    _, report = compress(_DeadBranch(), CompressConfig(method="fisher", budget=0.5, min_rank=1), batches)
    assert {row.name: row.rank for row in report.layers}["dead"] == 1


def test_fisher_lowers_the_model_output_error_against_whiten():
    model = mlp(3)
    batches = correlated_batches(4)
    X = torch.cat(batches)
    errors = {}
    for method in ("whiten", "fisher"):
        out, _ = compress(model, CompressConfig(method=method, rank=6, probes=8), batches)
        errors[method] = (out(X) - model(X)).norm().item()
    assert errors["fisher"] < errors["whiten"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_gram_accumulation_matches_a_float64_reference(dtype):
    """Narrow input is multiplied in float32 chunks and summed in float64: the Gram stays within
    float32 rounding of the exact one, however many rows arrive (heavy-tailed, as activations are)."""
    from svdkit.calibrate import GRAM_CHUNK, GramStats

    g = torch.Generator().manual_seed(0)
    rows = [torch.distributions.StudentT(3.0).sample((n, 48)) * torch.rand(48, generator=g) * 10 for n in (7, GRAM_CHUNK + 5, 3000)]
    stats = GramStats.zeros(48)
    for X in rows:
        stats.update(X.to(dtype))
    exact = np.concatenate([X.to(dtype).double().numpy() for X in rows])
    reference = exact.T @ exact
    scale = np.abs(exact).T @ np.abs(exact)
    assert stats.count == len(exact)
    assert np.max(np.abs(stats.gram.numpy() - reference) / scale) < (1e-12 if dtype == torch.float64 else 1e-6)
    np.testing.assert_allclose(stats.abs_sum.numpy(), np.abs(exact).sum(0), rtol=1e-6)


def test_cholesky_damping_escalates_on_a_singular_gram():
    G = torch.zeros(4, 4, dtype=torch.float64)
    G[0, 0] = 1.0
    L, used = cholesky_factor(G, damping=1e-12)
    assert used >= 1e-12
    torch.testing.assert_close(L @ L.T, G + used * 0.25 * torch.eye(4, dtype=torch.float64))


def test_whiten_falls_back_to_svd_when_a_layer_only_sees_zeros():
    model = mlp()
    batches = [torch.zeros(8, 24)]
    _, report = compress(model, CompressConfig(method="whiten", rank=3, target_modules=["0"]), batches)
    assert report.layers[0].method == "svd" and "whitening failed" in report.layers[0].skip_reason


def test_energy_spec_and_rank_pattern():
    model = mlp()
    _, report = compress(model, CompressConfig(method="svd", rank=Energy(0.5), rank_pattern={"2": 7}))
    ranks = {row.name: row.rank for row in report.layers}
    assert ranks["2"] == 7
    S = torch.linalg.svdvals(model[0].weight.double())
    expected = int(torch.searchsorted((S.square().cumsum(0) / S.square().sum()), torch.tensor(0.5, dtype=torch.float64))) + 1
    assert ranks["0"] == expected


def test_layers_at_or_above_break_even_stay_dense_with_a_reason():
    model = mlp()
    _, report = compress(model, CompressConfig(method="svd", rank=40))
    row = report.layers[1]  # 48x48: break-even 24
    assert row.rank is None and "break-even" in row.skip_reason and row.params_after == row.params_before


def test_conv2d_with_stride_dilation_and_groups():
    model = cnn()
    x = torch.randn(4, 3, 12, 12)
    batches = [torch.randn(8, 3, 12, 12) for _ in range(4)]
    out, report = compress(model, CompressConfig(method="whiten", rank=ParamRatio(0.5), kinds=("conv2d",)), batches)
    assert isinstance(out[0], LowRankConv2d) and isinstance(out[2], LowRankConv2d)
    assert out[2].groups == 2
    assert out(x).shape == model(x).shape
    assert [row.groups for row in report.layers] == [1, 2]
    assert report.layers[1].shape == (16, 8 * 9)


@pytest.mark.parametrize("conv", [
    dict(padding="same", dilation=2), dict(padding="valid"), dict(padding=2, padding_mode="reflect"),
    dict(padding=1, padding_mode="circular", stride=2),
])
def test_calibration_patches_match_the_convolution(conv):
    from svdkit.calibrate import layer_inputs

    layer = nn.Conv2d(3, 5, 3, **conv)
    x = torch.randn(2, 3, 9, 9)
    rows = layer_inputs(layer, x)  # (N * L, C * kh * kw)
    y = layer(x)
    expected = y.permute(0, 2, 3, 1).reshape(-1, 5)
    torch.testing.assert_close(rows @ layer.weight.reshape(5, -1).T + layer.bias, expected, rtol=1e-4, atol=1e-5)


def test_conv_whitening_uses_patches():
    model = cnn()
    batches = [torch.randn(8, 3, 12, 12) for _ in range(2)]
    _, report = compress(model, CompressConfig(method="whiten", rank=3, target_modules=["0"]), batches)
    assert report.layers[0].shape == (16, 27) and report.layers[0].method == "whiten"


# --- global budget ----------------------------------------------------------------------------


def brute_force(spectra, costs, dense_costs, budget):
    best_err = float("inf")
    for ks in itertools.product(*[range(1, len(s) + 1) for s in spectra]):
        spent = sum(min(k * c, d) for k, c, d in zip(ks, costs, dense_costs))
        if spent > budget:
            continue
        err = sum(float((s[k:] ** 2).sum()) if k * c < d else 0.0 for s, k, c, d in zip(spectra, ks, costs, dense_costs))
        best_err = min(best_err, err)
    return best_err


@pytest.mark.parametrize("seed", range(6))
def test_allocate_ranks_respects_the_budget_and_is_near_optimal(seed):
    g = np.random.default_rng(seed)
    spectra = [np.sort(g.gamma(1.0, size=5) * g.uniform(0.5, 3))[::-1] for _ in range(3)]
    costs, dense_costs = [10, 10, 10], [40, 40, 40]
    budget = int(g.integers(40, 100))
    ranks = allocate_ranks([torch.tensor(s.copy()) for s in spectra], costs, dense_costs, budget)
    spent = sum(dense_costs[i] if k is None else k * costs[i] for i, k in enumerate(ranks))
    assert spent <= budget
    err = sum(0.0 if k is None else float((s[k:] ** 2).sum()) for s, k in zip(spectra, ranks))
    assert err <= brute_force(spectra, costs, dense_costs, budget) * 1.5 + 1e-9


def test_allocate_ranks_errors():
    with pytest.raises(ValueError, match="cannot keep rank 1"):
        allocate_ranks([torch.ones(3)], [10], [20], 5)
    with pytest.raises(ValueError, match="spectra"):
        allocate_ranks([torch.ones(3)], [10, 2], [20], 50)


def test_global_budget_is_respected_and_shares_ranks_unevenly():
    model = mlp()
    batches = correlated_batches()
    _, report = compress(model, CompressConfig(method="fisher", budget=0.5), batches)
    # within the budget, and short of it by less than one more rank of the costliest layer
    step = max((row.shape[0] + row.shape[1]) * row.groups for row in report.layers) / report.target_params_before
    assert 0.5 - step <= report.kept_fraction <= 0.5 + 1e-9
    assert len({row.rank for row in report.layers}) > 1


def test_budget_over_the_whole_model():
    model = mlp()
    batches = correlated_batches()
    out, report = compress(model, CompressConfig(method="fisher", budget=0.6, budget_scope="model"), batches)
    assert sum(p.numel() for p in out.parameters()) <= 0.6 * sum(p.numel() for p in model.parameters()) + 1


# --- refit --------------------------------------------------------------------------------------


def test_refit_of_a_single_layer_with_unchanged_inputs_equals_whiten():
    model = mlp()
    batches = correlated_batches()
    config = dict(method="whiten", rank=5, target_modules=["0"], damping=1e-12)
    plain, _ = compress(model, CompressConfig(**config), batches)
    refitted, report = compress(model, CompressConfig(**config, refit=1), batches)
    X = torch.cat(batches)
    torch.testing.assert_close(refitted[0](X), plain[0](X), rtol=1e-3, atol=1e-3)
    assert report.layers[0].method == "whiten+refit"


def test_refit_lowers_the_error_of_a_later_layer_given_its_inputs():
    model = mlp()
    batches = correlated_batches()
    X = torch.cat(batches)
    config = dict(method="whiten", rank=4, target_modules=["0", "2"])
    plain, _ = compress(model, CompressConfig(**config), batches)
    refitted, _ = compress(model, CompressConfig(**config, refit=1), batches)
    # Layer 2 after refit fits the original layer-2 output from the compressed layer-0 features.
    target = model[2](model[1](model[0](X)))
    features = plain[1](plain[0](X))
    err_plain = (plain[2](features) - target).norm()
    err_refit = (refitted[2](features) - target).norm()
    assert err_refit < err_plain


# --- save / load --------------------------------------------------------------------------------


def test_save_load_reproduces_outputs(tmp_path):
    model = cnn()
    batches = [torch.randn(8, 3, 12, 12) for _ in range(2)]
    out, _ = compress(model, CompressConfig(method="whiten", rank=ParamRatio(0.5)), batches)
    config = CompressConfig(method="whiten", rank=ParamRatio(0.5))
    save_compressed(out, tmp_path / "c", config=config)
    meta = json.loads((tmp_path / "c" / "svdkit_compressed.json").read_text())
    assert meta["format_version"] == 3 and meta["config"]["method"] == "whiten"
    loaded = load_compressed(tmp_path / "c", base=cnn(seed=5))
    x = torch.randn(3, 3, 12, 12)
    torch.testing.assert_close(loaded(x), out(x))
    dense = decompress(loaded)
    assert not any(isinstance(m, (LowRankConv2d, LowRankLinear)) for m in dense.modules())
    torch.testing.assert_close(dense(x), out(x), rtol=1e-4, atol=1e-5)


def test_save_is_atomic_and_refuses_to_overwrite(tmp_path):
    out, _ = compress(mlp(), CompressConfig(method="svd", rank=3))
    save_compressed(out, tmp_path / "c")
    with pytest.raises(FileExistsError):
        save_compressed(out, tmp_path / "c")
    save_compressed(out, tmp_path / "c", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_load_errors(tmp_path):
    out, _ = compress(mlp(), CompressConfig(method="svd", rank=3))
    save_compressed(out, tmp_path / "c")
    with pytest.raises(FileNotFoundError):
        load_compressed(tmp_path / "missing", base=mlp())
    with pytest.raises(ValueError, match="does not fit"):
        load_compressed(tmp_path / "c", base=mlp(width=32))
    meta_path = tmp_path / "c" / "svdkit_compressed.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(dict(meta, format_version=99)))
    with pytest.raises(ValueError, match="format version 99"):
        load_compressed(tmp_path / "c", base=mlp())
    meta_path.write_text("{not json")
    with pytest.raises(ValueError, match="corrupted"):
        load_compressed(tmp_path / "c", base=mlp())
    meta_path.write_text(json.dumps(meta))
    (tmp_path / "c" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="SHA-256"):
        load_compressed(tmp_path / "c", base=mlp())
    with pytest.raises(ValueError, match="cannot read"):
        load_compressed(tmp_path / "c", base=mlp(), verify=False)
    (tmp_path / "c" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_compressed(tmp_path / "c", base=mlp())


# --- bad input ------------------------------------------------------------------------------------


def test_bad_input_errors():
    model = mlp()
    with pytest.raises(ValueError, match="rank must be >= 1"):
        CompressConfig(rank=0)
    with pytest.raises(ValueError, match="energy fraction"):
        CompressConfig(rank=Energy(1.5))
    with pytest.raises(ValueError, match="no supported layer matched"):
        compress(model, CompressConfig(method="svd", target_modules=["nothing"]))
    with pytest.raises(ValueError, match="needs calibration data"):
        compress(model, CompressConfig(method="whiten"))
    with pytest.raises(ValueError, match="unknown method"):
        CompressConfig(method="magic")
    with pytest.raises(ValueError, match="budget"):
        CompressConfig(budget=1.5)
    broken = mlp()
    with torch.no_grad():
        broken[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer 2 .* non-finite"):
        compress(broken, CompressConfig(method="svd"))


def test_calibration_that_never_reaches_a_layer_is_an_error():
    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(ValueError, match="never reached 1 target layer.*unused"):
        compress(Skips(), CompressConfig(method="whiten", rank=2), [torch.randn(4, 8)])


def test_config_json_round_trip():
    config = CompressConfig(rank=Energy(0.9), rank_pattern={"q": ParamRatio(0.3)}, target_modules=["a", "b"], budget=None)
    again = CompressConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    with pytest.raises(ValueError, match="unknown CompressConfig fields"):
        CompressConfig.from_dict({"ranks": 3})


def test_report_table_and_json(tmp_path):
    _, report = compress(mlp(), CompressConfig(method="svd", rank=4))
    table = report.to_table()
    first = table.splitlines()[2].split()
    assert "total (3/3 factorized)" in table
    assert first[:4] == ["0", "48x24", "4", f"{4 * (48 + 24):,}"]  # name, shape, rank, parameters
    data = json.loads(report.to_json())
    assert data["totals"]["target_params_after"] == report.target_params_after
    assert len(data["layers"]) == 3
    report.to_json(tmp_path / "report.json")
    assert json.loads((tmp_path / "report.json").read_text()) == data
    pd = pytest.importorskip("pandas")
    frame = report.to_pandas()
    assert isinstance(frame, pd.DataFrame) and list(frame["name"]) == ["0", "2", "4"]
    assert int(frame["params_after"].sum()) == sum(layer.params_after for layer in report.layers)


def test_heal_lowers_the_output_error_and_only_trains_the_factorized_layers():
    model = mlp(2)
    batches = correlated_batches(3)
    X = torch.cat(batches)
    config = dict(method="whiten", rank=3, target_modules=["0", "2"])
    plain, _ = compress(model, CompressConfig(**config), batches)
    healed, report = compress(model, CompressConfig(**config, heal_steps=60, heal_lr=3e-3), batches)
    assert (healed(X) - model(X)).norm() < (plain(X) - model(X)).norm()
    torch.testing.assert_close(healed[4].weight, model[4].weight)  # dense layer untouched
    assert "heal loss" in " ".join(report.quality)
    assert all(p.requires_grad for p in healed.parameters()) and all(p.grad is None for p in healed.parameters())
    with pytest.raises(ValueError, match="needs calibration data"):
        compress(model, CompressConfig(method="svd", heal_steps=5))


def test_a_budget_sweep_equals_separate_compressions():
    from svdkit.compression import compress_sweep

    model, batches = mlp(), correlated_batches()
    config = CompressConfig(method="fisher", budget=0.5)
    swept = compress_sweep(model, config, [0.3, 0.6], batches)
    for budget, (out, report) in zip([0.3, 0.6], swept):
        alone, alone_report = compress(model, CompressConfig(method="fisher", budget=budget), batches)
        assert [r.rank for r in report.layers] == [r.rank for r in alone_report.layers]
        for key, value in alone.state_dict().items():
            torch.testing.assert_close(out.state_dict()[key], value, rtol=0, atol=0)
    assert swept[0][1].kept_fraction < swept[1][1].kept_fraction <= 0.6
