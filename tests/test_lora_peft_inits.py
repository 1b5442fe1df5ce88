"""Adapters PEFT saved with a weight-moving init (PiSSA, OLoRA): imported as PEFT loads them, or refused."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from svdkit.lora import export_peft, import_peft, lora_layers

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")


def _gpt2():
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2Model(config).eval()


def _ids():
    return torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(4))


def _out(model):
    with torch.no_grad():
        return model(_ids()).last_hidden_state


def _peft_adapter(base, directory, init, targets):
    """Train-like PEFT adapter saved the normal way (no conversion), with per-layer ranks and alphas."""
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init,
        rank_pattern={targets[1]: 2}, alpha_pattern={targets[0]: 3},
    )
    model = peft.get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(directory))
    return directory


CASES = [("llama", "pissa"), ("llama", "olora"), ("gpt2", "pissa")]


@pytest.mark.parametrize("family, init", CASES)
def test_pissa_and_olora_adapters_import_exactly_as_peft_loads_them(tmp_path, make_decoder, family, init):
    base = make_decoder("llama") if family == "llama" else _gpt2()
    targets = ["q_proj", "down_proj"] if family == "llama" else ["c_attn", "c_proj"]
    directory = _peft_adapter(base, tmp_path / "adapter", init, targets)
    assert json.loads((directory / "adapter_config.json").read_text())["init_lora_weights"] == init
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()
    before = {k: v.clone() for k, v in base.state_dict().items()}

    ours = import_peft(directory, base)
    expected = _out(peft_model)
    assert float((expected - _out(base)).abs().max()) > 0.1  # the residual matters
    torch.testing.assert_close(_out(ours), expected, rtol=0, atol=1e-6)
    for name, layer in lora_layers(ours):  # the same residual, bit for bit
        theirs = peft_model.base_model.model.get_submodule(name).base_layer.weight
        assert torch.equal(layer.base_layer.weight, theirs), name
        assert layer.moved_weight
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())  # the input model is untouched

    # exported again, it is plain rank-2r LoRA for the unmodified base
    export_peft(ours, tmp_path / "plain")
    plain = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert plain["init_lora_weights"] is True
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    for name, layer in lora_layers(ours):
        assert tensors[f"base_model.model.{name}.lora_A.weight"].shape[0] == 2 * layer.rank
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "plain")).eval()
    torch.testing.assert_close(_out(again), expected, rtol=0, atol=1e-5)


def test_pissa_niter_adapters_are_refused_with_the_conversion_recipe(tmp_path, make_decoder):
    base = make_decoder("llama")
    directory = _peft_adapter(base, tmp_path / "adapter", "pissa_niter_4", ["q_proj", "v_proj"])
    with pytest.raises(ValueError, match=r"init_lora_weights='pissa_niter_4'.*path_initial_model_for_weight_conversion"):
        import_peft(directory, base)


def _edited(tmp_path, base, **changes):
    """An svdkit-exported plain adapter whose config claims another init."""
    from svdkit.lora import add_lora

    directory = tmp_path / "edited"
    model = add_lora(base, None, r=2)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(std=0.1)
    export_peft(model, directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    config.update(changes)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("init, reason", [
    ("corda", "CorDA's calibration statistics"),
    ("loftq", "quantized"),
    ("lora_ga", "gradients"),
    ("something_new", "an init svdkit does not know"),
])
def test_other_base_rewriting_inits_are_refused(tmp_path, make_decoder, init, reason):
    directory = _edited(tmp_path, make_decoder("llama"), init_lora_weights=init)
    with pytest.raises(ValueError, match=f"init_lora_weights={init!r}.*{reason}.*path_initial_model_for_weight_conversion"):
        import_peft(directory, make_decoder("llama"))


def test_olora_on_conv1d_is_refused(tmp_path):
    directory = _edited(tmp_path, _gpt2(), init_lora_weights="olora")
    with pytest.raises(ValueError, match="'olora', which PEFT applies to linear layers only.*'h.0.attn.c_attn', a conv1d"):
        import_peft(directory, _gpt2())


@pytest.mark.parametrize("init", ["gaussian", "eva", "orthogonal", "mica", True, False])
def test_inits_that_leave_the_base_alone_import_as_plain_lora(tmp_path, make_decoder, init):
    base = make_decoder("llama")
    directory = _edited(tmp_path, base, init_lora_weights=init)
    ours = import_peft(directory, base)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()
    assert not any(layer.moved_weight for _, layer in lora_layers(ours))
    assert float((_out(ours) - _out(base)).abs().max()) > 1e-3
    torch.testing.assert_close(_out(ours), _out(theirs), rtol=0, atol=1e-5)
