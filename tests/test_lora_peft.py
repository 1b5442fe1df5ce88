"""PEFT interop, for real: svdkit -> PEFT directory -> peft.PeftModel, and PEFT -> svdkit."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from svdkit.lora import add_lora, export_peft, extract_lora, find_root, import_peft, lora_layers, peft_factors

peft = pytest.importorskip("peft")


pytestmark = pytest.mark.usefixtures("one_thread")


def _gpt2(n_embd: int = 64, n_layer: int = 2):
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2Model(config).eval()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def base(request, make_decoder):
    return request.param, _gpt2() if request.param == "gpt2" else make_decoder("llama")


def _ids():
    return torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(4))


def _out(model):
    with torch.no_grad():
        return model(_ids()).last_hidden_state


def _train_a_little(model, seed: int = 0):
    """Stand in for training: move every adapter factor (B away from zero too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _peft_load(original, directory):
    return peft.PeftModel.from_pretrained(copy.deepcopy(original), str(directory)).eval()


@pytest.mark.parametrize("init", ["gaussian", "eva"])
def test_round_trip_through_peft(tmp_path, base, init):
    _, model = base
    calibration = [{"input_ids": _ids()}]
    lora_model = _train_a_little(add_lora(model, "all-linear", r=4, lora_alpha=8, init_lora_weights=init, calibration=calibration))
    export_peft(lora_model, tmp_path, base_model_name_or_path="tiny-test-model")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["base_model_name_or_path"] == "tiny-test-model"
    assert (tmp_path / "adapter_model.safetensors").exists()
    peft_model = _peft_load(model, tmp_path)
    y = _out(lora_model)
    assert float((y - _out(model)).abs().max()) > 1e-2  # the adapters do something
    torch.testing.assert_close(_out(peft_model), y, rtol=0, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "milora"])
def test_weight_moving_adapters_export_as_rank_2r_plain_lora(tmp_path, base, init):
    _, model = base
    lora_model = _train_a_little(add_lora(model, None, r=3, lora_alpha=6, init_lora_weights=init, svd_method="exact"))
    export_peft(lora_model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 6 and config["lora_alpha"] == 12  # scaling alpha / r unchanged
    peft_model = _peft_load(model, tmp_path)  # the unmodified base
    torch.testing.assert_close(_out(peft_model), _out(lora_model), rtol=0, atol=1e-5)


def test_rslora_conversion_keeps_the_scaling(tmp_path, make_decoder):
    model = make_decoder("llama")
    lora_model = _train_a_little(add_lora(model, ["q_proj", "v_proj"], r=4, lora_alpha=8, init_lora_weights="pissa", use_rslora=True))
    B, A, rank, alpha = peft_factors(lora_model.layers[0].self_attn.q_proj)
    assert rank == 8 and alpha == pytest.approx(8 * 2**0.5)
    export_peft(lora_model, tmp_path)
    torch.testing.assert_close(_out(_peft_load(model, tmp_path)), _out(lora_model), rtol=0, atol=1e-5)


def test_mixed_ranks_use_rank_and_alpha_patterns(tmp_path, base):
    name, model = base
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        for p in tuned.parameters():
            if p.ndim == 2 and p.shape[0] != 100:
                p.add_(0.02 * torch.randn_like(p))
    from svdkit.linalg import Energy

    lora_model, report = extract_lora(model, tuned, r=Energy(0.5), exclude_modules=["wte", "wpe", "embed_tokens"])
    assert len({e.rank for e in report.layers}) > 1
    export_peft(lora_model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["alpha_pattern"]
    torch.testing.assert_close(_out(_peft_load(model, tmp_path)), _out(lora_model), rtol=0, atol=1e-5)


def test_import_peft_reads_what_peft_writes(tmp_path, base):
    name, model = base
    targets = ["c_attn", "c_fc"] if name == "gpt2" else ["q_proj", "down_proj"]
    peft_model = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, rank_pattern={targets[1]: 2})
    )
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    peft_model.save_pretrained(str(tmp_path))
    ours = import_peft(tmp_path, model)
    assert {layer.rank for _, layer in lora_layers(ours)} == {4, 2}
    assert all(not p.requires_grad for p in ours.parameters())
    torch.testing.assert_close(_out(ours), _out(peft_model.eval()), rtol=0, atol=1e-5)
    trainable = import_peft(tmp_path, model, trainable=True)
    assert {n.rsplit(".", 2)[-2] for n, p in trainable.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    # and back out again
    export_peft(ours, tmp_path / "again")
    torch.testing.assert_close(_out(_peft_load(model, tmp_path / "again")), _out(ours), rtol=0, atol=1e-5)


def test_import_refuses_an_adapter_for_another_model(tmp_path, make_decoder):
    small = _gpt2()
    export_peft(_train_a_little(add_lora(small, None, r=2)), tmp_path / "gpt2", base_model_name_or_path="gpt2-tiny")
    with pytest.raises(ValueError, match="made for 'gpt2-tiny'.*does not fit this model: it targets 'h.0.attn.c_attn'"):
        import_peft(tmp_path / "gpt2", make_decoder("llama"))
    wider = _gpt2(n_embd=32)
    with pytest.raises(ValueError, match="does not fit layer 'h.0.attn.c_attn' of this model: it has lora_A \\(2, 64\\)"):
        import_peft(tmp_path / "gpt2", wider)
    deeper_adapter = _gpt2(n_layer=3)
    export_peft(add_lora(deeper_adapter, ["c_attn"], r=2), tmp_path / "deep")
    before = {k: v.clone() for k, v in small.state_dict().items()}
    with pytest.raises(ValueError, match="it targets 'h.2.attn.c_attn', which the model lacks"):
        import_peft(tmp_path / "deep", small, inplace=True)
    assert set(small.state_dict()) == set(before)  # nothing wrapped


def test_import_refuses_other_adapter_kinds_and_missing_files(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ValueError, match="'IA3' adapter; only LORA"):
        import_peft(tmp_path, _gpt2())
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    with pytest.raises(ValueError, match="uses use_dora"):
        import_peft(tmp_path, _gpt2())
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter directory"):
        import_peft(tmp_path / "missing", _gpt2())


def test_root_detection_and_explicit_root():
    model = _gpt2()
    wrapper = torch.nn.Sequential(torch.nn.Identity(), model)
    assert find_root(wrapper)[0] == "1"
    assert find_root(model)[0] == ""
    with pytest.raises(ValueError, match="no submodule 'nope'"):
        find_root(model, "nope")


def test_export_under_a_wrapper_writes_paths_relative_to_the_root(tmp_path):
    model = _gpt2()
    wrapper = torch.nn.Sequential(torch.nn.Identity(), copy.deepcopy(model))
    lora_wrapper = _train_a_little(add_lora(wrapper, ["c_attn"], r=2))
    export_peft(lora_wrapper, tmp_path)
    from safetensors.torch import load_file

    keys = sorted(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys[0] == "base_model.model.h.0.attn.c_attn.lora_A.weight"
    with torch.no_grad():
        expected = lora_wrapper[1](_ids()).last_hidden_state
    torch.testing.assert_close(_out(_peft_load(model, tmp_path)), expected, rtol=0, atol=1e-5)
