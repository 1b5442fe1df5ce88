"""Bad input and faults on the LoRA side: clear errors that name the thing, and nothing lost."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from svdkit.layers.lora import LoRALayer
from svdkit.lora import (
    add_lora,
    export_peft,
    extract_lora,
    import_peft,
    lora_layers,
    merge_and_unload,
    merge_lora,
    register_init,
    unregister_init,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before, *, atol=0.0):
    after = model.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=atol, equal_nan=True)
    assert not lora_layers(model)


def _with_b(model, value=0.1):
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(std=value)
    return model


# -- issue 11 #8: the mode of the model the wrappers join --------------------------------------------
def test_wrappers_added_to_an_eval_model_apply_no_dropout(mlp):
    lora_model = _with_b(add_lora(mlp, None, r=4, lora_dropout=0.5))
    assert all(not layer.training for _, layer in lora_layers(lora_model))
    x = torch.randn(16, 24)
    torch.testing.assert_close(lora_model(x), lora_model(x), rtol=0, atol=0)
    lora_model.train()
    assert not torch.equal(lora_model(x), lora_model(x))  # dropout is real once training


def test_wrappers_added_to_a_training_model_train(mlp):
    lora_model = add_lora(mlp.train(), None, r=2, lora_dropout=0.1)
    assert all(layer.training and layer.lora_dropout.training for _, layer in lora_layers(lora_model))


def test_imported_wrappers_take_the_models_eval_mode(tmp_path, mlp):
    export_peft(_with_b(add_lora(mlp, None, r=4, lora_dropout=0.5)), tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["lora_dropout"] == 0.5
    imported = import_peft(tmp_path / "adapter", mlp)
    x = torch.randn(16, 24)
    torch.testing.assert_close(imported(x), imported(x), rtol=0, atol=0)
    assert float((imported(x) - mlp(x)).abs().max()) > 1e-3


# -- merging: all or nothing --------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["merge_lora", "merge_and_unload"])
def test_safe_merge_with_a_nan_adapter_in_the_second_layer_merges_nothing(mlp, how):
    lora_model = _with_b(add_lora(mlp, None, r=2))
    with torch.no_grad():
        lora_model.fc2.lora_A.weight[0, 0] = float("nan")
    before = {n: layer.base_layer.weight.detach().clone() for n, layer in lora_layers(lora_model)}
    merge = merge_lora if how == "merge_lora" else (lambda m, safe: merge_and_unload(m, safe=safe, inplace=True))
    with pytest.raises(ValueError, match="merging layer 'fc2' would write non-finite values.*nothing was merged"):
        merge(lora_model, safe=True)
    for name, layer in lora_layers(lora_model):
        assert not layer.merged
        assert torch.equal(layer.base_layer.weight, before[name]), name


# -- NaN weights name the layer --------------------------------------------------------------------------
@pytest.mark.parametrize("inplace", [False, True])
def test_pissa_on_a_nan_weight_names_the_layer_and_changes_nothing(mlp, inplace):
    with torch.no_grad():
        mlp.fc2.weight[3, 4] = float("nan")
    before = _state(mlp)
    with pytest.raises(ValueError, match="layer 'fc2': its weight holds 1 non-finite value.*init 'pissa' needs it finite"):
        add_lora(mlp, None, r=4, init_lora_weights="pissa", inplace=inplace)
    _assert_unchanged(mlp, before)


def test_extraction_from_a_nan_fine_tune_names_the_layer_and_the_model(mlp):
    tuned = copy.deepcopy(mlp)
    with torch.no_grad():
        tuned.head.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="layer 'head': the fine-tuned model's weight holds 1 non-finite value"):
        extract_lora(mlp, tuned, r=2)


# -- an init that fails midway leaves the caller's model as it was -----------------------------------------
@pytest.fixture
def failing_init():
    """PiSSA on the first layer, then a failure on the second."""
    calls = []

    @register_init("test_fails_second", moves_weight=True)
    def fails_second(layer, ctx):
        calls.append(ctx.name)
        if len(calls) == 2:
            raise RuntimeError("boom")
        out_features, d = layer.matrix_shape
        g = torch.Generator().manual_seed(0)
        layer.move_into_adapter(torch.randn(out_features, layer.rank, generator=g), torch.randn(layer.rank, d, generator=g))

    yield "test_fails_second"
    unregister_init("test_fails_second")


def test_a_failing_init_in_place_is_rolled_back(mlp, failing_init):
    before = _state(mlp)
    with pytest.raises(ValueError, match="init 'test_fails_second' failed on layer 'fc2': boom"):
        add_lora(mlp, None, r=2, init_lora_weights=failing_init, inplace=True)
    assert isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.fc2, nn.Linear)
    _assert_unchanged(mlp, before, atol=1e-6)  # the moved part is added back (float rounding)


# -- PEFT files -----------------------------------------------------------------------------------------------
@pytest.fixture
def adapter(tmp_path, mlp):
    return export_peft(_with_b(add_lora(mlp, None, r=4)), tmp_path / "adapter")


def test_import_refuses_tensors_of_another_rank_than_the_config_says(adapter, mlp):
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(ValueError, match=r"does not match its config: 'fc1' should have rank 8 \(r=8\), but its tensors have lora_A \(4, 24\)"):
        import_peft(adapter, mlp)
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": {"fc2": 2}}))
    with pytest.raises(ValueError, match=r"'fc2' should have rank 2 \(rank_pattern\['fc2'\]\)"):
        import_peft(adapter, mlp)


def test_import_of_a_truncated_weights_file_names_it(adapter, mlp):
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"cannot read the adapter weights '{weights}' \\(truncated or not a safetensors file\\)"):
        import_peft(adapter, mlp)


def test_import_of_a_corrupt_config_names_it(adapter, mlp):
    path = adapter / "adapter_config.json"
    path.write_text(path.read_text()[:40])
    with pytest.raises(ValueError, match=f"cannot read the adapter config '{path}'"):
        import_peft(adapter, mlp)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="is not a JSON object"):
        import_peft(adapter, mlp)


def test_import_refuses_nan_adapters(adapter, mlp):
    from safetensors.torch import load_file, save_file

    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors["base_model.model.fc2.lora_B.weight"][0, 0] = float("nan")
    save_file(tensors, str(weights))
    before = _state(mlp)
    with pytest.raises(ValueError, match="damaged: tensor 'base_model.model.fc2.lora_B.weight' holds 1 non-finite"):
        import_peft(adapter, mlp, inplace=True)
    _assert_unchanged(mlp, before)


def test_a_failing_import_in_place_is_rolled_back(adapter, mlp, monkeypatch):
    import svdkit.lora.peft_io as peft_io

    calls = []
    real = peft_io.replace_module

    def fail_second(*args):
        calls.append(args[1])
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return real(*args)

    monkeypatch.setattr(peft_io, "replace_module", fail_second)
    before = _state(mlp)
    with pytest.raises(RuntimeError, match="disk on fire"):
        import_peft(adapter, mlp, inplace=True)
    monkeypatch.undo()
    _assert_unchanged(mlp, before)


def test_export_refuses_to_overwrite_an_adapter(adapter, mlp):
    other = _with_b(add_lora(mlp, None, r=2), 0.3)
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    with pytest.raises(FileExistsError, match="already holds a PEFT adapter.*pass overwrite=True"):
        export_peft(other, adapter)
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before
    export_peft(other, adapter, overwrite=True)
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 2
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_a_failing_export_leaves_the_existing_adapter(adapter, mlp, monkeypatch):
    import safetensors.torch

    before = {p.name: p.read_bytes() for p in adapter.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="no space left"):
        export_peft(add_lora(mlp, None, r=2), adapter, overwrite=True)
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before
    fresh = adapter.parent / "fresh"
    with pytest.raises(OSError, match="no space left"):
        export_peft(add_lora(mlp, None, r=2), fresh)
    assert not fresh.exists()


# -- EVA with data that does not fit -------------------------------------------------------------------------
def test_eva_with_wrong_shape_data_names_the_layer_and_the_batch(mlp):
    batches = [torch.randn(8, 24), torch.randn(8, 20)]
    before = _state(mlp)
    with pytest.raises(ValueError, match=r"calibration batch 1 reaches layer 'fc1' as a tensor of shape \(8, 20\), but the layer takes 24 input features"):
        add_lora(mlp, None, r=2, init_lora_weights="eva", calibration=batches)
    _assert_unchanged(mlp, before)
    assert not mlp.fc1._forward_pre_hooks  # every hook removed


def test_eva_with_integer_or_nan_data_names_the_layer(mlp):
    with pytest.raises(ValueError, match="calibration batch 0 reaches layer 'fc1' as torch.int64"):
        add_lora(mlp, None, r=2, init_lora_weights="eva", calibration=[torch.ones(4, 24, dtype=torch.long)])
    bad = torch.randn(8, 24)
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="batch 0.*layer '?fc1'?.*NaN"):
        add_lora(mlp, None, r=2, init_lora_weights="eva", calibration=[bad])
    from svdkit.calibrate import GramStats

    stats = GramStats.zeros(24)
    stats.gram[0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer 'fc1': its input statistics hold NaN/Inf.*init 'eva' needs it finite"):
        add_lora(mlp, ["fc1"], r=2, init_lora_weights="eva", input_stats={"fc1": stats})


def test_eva_on_a_conv_with_the_wrong_channels():
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    with pytest.raises(ValueError, match=r"reaches layer '0' as a tensor of shape \(1, 5, 8, 8\), but the layer takes 3 input features"):
        add_lora(model, None, r=2, init_lora_weights="eva", calibration=[torch.randn(1, 5, 8, 8)])


def test_a_grouped_conv_is_refused_before_anything_is_wrapped():
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3, groups=2))
    before = _state(model)
    with pytest.raises(ValueError, match="layer '1': LoRA on a grouped Conv2d"):
        add_lora(model, None, r=2, init_lora_weights="pissa", inplace=True)
    _assert_unchanged(model, before)
    assert not any(isinstance(m, LoRALayer) for m in model.modules())
