"""The whole-model pipeline: the input model untouched, layers replaced, convolutions, refit, healing, sweeps, the report."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from svdkit.compression import CompressConfig, compress
from svdkit.layers import LowRankConv2d, LowRankLinear
from svdkit.linalg import Energy, ParamRatio

from compression_helpers import cnn, correlated_batches, mlp


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


@pytest.mark.parametrize("old, new, value", [("overrides", "rank_pattern", {}), ("exclude", "exclude_modules", ["x"]),
                                             ("alpha", "asvd_alpha", 0.25), ("heal_steps", "layerwise_distill_steps", 7),
                                             ("heal_lr", "layerwise_distill_lr", 3e-3)])
def test_configs_saved_under_earlier_names_are_read_under_todays_names(old, new, value):
    with pytest.warns(DeprecationWarning, match=f"{old!r} is now called {new!r}"):
        config = CompressConfig.from_dict({old: value})
    assert getattr(config, new) == (tuple(value) if isinstance(value, list) else value)
    with pytest.raises(ValueError, match=f"gives both {old!r}"):
        CompressConfig.from_dict({old: value, new: value})
    with pytest.raises(TypeError):
        CompressConfig(**{old: value})  # earlier names are read from saved configs only


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


def test_layerwise_distillation_lowers_the_output_error_and_only_trains_the_factorized_layers():
    model = mlp(2)
    batches = correlated_batches(3)
    X = torch.cat(batches)
    config = dict(method="whiten", rank=3, target_modules=["0", "2"])
    plain, _ = compress(model, CompressConfig(**config), batches)
    healed, report = compress(model, CompressConfig(**config, layerwise_distill_steps=60, layerwise_distill_lr=3e-3), batches)
    assert (healed(X) - model(X)).norm() < (plain(X) - model(X)).norm()
    torch.testing.assert_close(healed[4].weight, model[4].weight)  # dense layer untouched
    assert "layer-wise distillation loss" in " ".join(report.quality)
    assert all(p.requires_grad for p in healed.parameters()) and all(p.grad is None for p in healed.parameters())
    with pytest.raises(ValueError, match="needs calibration data"):
        compress(model, CompressConfig(method="svd", layerwise_distill_steps=5))


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

