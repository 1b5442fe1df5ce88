"""LoRAConfig with PEFT's names (earlier names read only from saved configs), PEFT's adapter_config.json,
and the rank vocabulary."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from svdkit.linalg import Energy, ErrorTol, ParamRatio, RankRatio
from svdkit.lora import (
    LoRAConfig,
    add_lora,
    analyze_deltas,
    apply_lora,
    extract_lora,
    lora_layers,
    select_lora_targets,
    weight_deltas,
    wrap_lora,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_fields_are_peft_names_and_earlier_names_are_refused():
    config = LoRAConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.1, init_lora_weights="pissa",
        rank_pattern={"q_proj": 4}, alpha_pattern={"v_proj": 4.0}, exclude_modules=["lm_head"],
    )
    assert (config.r, config.lora_alpha, config.target_modules, config.exclude_modules) == (8, 16, ("q_proj", "v_proj"), ("lm_head",))
    peft = pytest.importorskip("peft")
    peft_fields = set(peft.LoraConfig.__dataclass_fields__)
    for name in ("r", "lora_alpha", "target_modules", "exclude_modules", "lora_dropout", "init_lora_weights",
                 "rank_pattern", "alpha_pattern", "use_rslora"):
        assert name in peft_fields and name in LoRAConfig.__dataclass_fields__
    for old, value in (("rank", 8), ("alpha", 16), ("init", "pissa"), ("targets", ["q_proj"]), ("dropout", 0.1),
                       ("exclude", ["lm_head"]), ("ranc", 4)):
        with pytest.raises(TypeError, match=f"unexpected keyword argument '{old}'"):
            LoRAConfig(**{old: value})


@pytest.mark.parametrize("old, new, value", [
    ("rank", "r", 4), ("alpha", "lora_alpha", 16.0), ("init", "init_lora_weights", "pissa"),
    ("targets", "target_modules", ["q_proj"]), ("dropout", "lora_dropout", 0.1), ("exclude", "exclude_modules", ["lm_head"]),
])
def test_from_dict_reads_a_config_saved_under_the_earlier_names_with_a_warning(old, new, value):
    current = LoRAConfig.from_dict({new: value})
    with pytest.warns(DeprecationWarning, match=f"'{old}' is now called '{new}'"):
        earlier = LoRAConfig.from_dict({old: value})
    assert earlier == current and earlier != LoRAConfig()
    with pytest.raises(ValueError, match=f"gives both '{old}' .* and '{new}'"):
        LoRAConfig.from_dict({old: value, new: value})


def test_from_dict_reads_a_whole_earlier_config():
    saved = {"rank": 4, "alpha": 8, "init": "pissa", "targets": ["fc1"], "dropout": 0.0, "exclude": [],
             "use_rslora": False, "svd_method": "auto", "n_iter": 4, "oversamples": 0, "seed": 0,
             "rank_pattern": {}, "alpha_pattern": {}}
    with pytest.warns(DeprecationWarning) as caught:
        config = LoRAConfig.from_dict(saved)
    assert config == LoRAConfig(r=4, lora_alpha=8, init_lora_weights="pissa", target_modules=("fc1",))
    renamed = [("rank", "r"), ("alpha", "lora_alpha"), ("init", "init_lora_weights"), ("targets", "target_modules"),
               ("dropout", "lora_dropout"), ("exclude", "exclude_modules")]
    assert sorted(str(w.message) for w in caught) == sorted(f"LoRAConfig field {old!r} is now called {new!r}" for old, new in renamed)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # today's names round-trip without a warning
        assert LoRAConfig.from_dict(config.to_dict()) == config
        assert set(config.to_dict()).isdisjoint(old for old, _ in renamed)


def test_init_lora_weights_true_is_peft_default_kaiming(mlp):
    assert LoRAConfig(init_lora_weights=True).init_lora_weights == "kaiming"
    lora_model = add_lora(mlp, None, r=4, init_lora_weights=True, seed=1)
    x = torch.randn(5, 24)
    torch.testing.assert_close(lora_model(x), mlp(x), rtol=0, atol=0)  # B = 0
    A = lora_model.fc2.lora_A.weight.detach()
    bound = 1 / 32**0.5  # PEFT's kaiming_uniform_(a=sqrt(5)) on a (r, in) weight: U(-1/sqrt(in), 1/sqrt(in))
    assert float(A.abs().max()) <= bound and float(A.abs().max()) > 0.8 * bound
    assert abs(float(A.mean())) < 0.3 * bound
    with pytest.raises(ValueError, match="init_lora_weights=False"):
        LoRAConfig(init_lora_weights=False)
    with pytest.raises(ValueError, match="svd_method='randomized', n_iter=4"):
        LoRAConfig(init_lora_weights="pissa_niter_4")


def test_from_dict_reads_peft_adapter_config(tmp_path):
    peft = pytest.importorskip("peft")
    peft_config = peft.LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], use_rslora=True,
        rank_pattern={r"layers\.0\..*": 4}, alpha_pattern={"v_proj": 8}, init_lora_weights="pissa_niter_16",
        task_type="CAUSAL_LM", exclude_modules=["lm_head"],
    )
    peft_config.save_pretrained(str(tmp_path))  # PEFT's own adapter_config.json
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # PEFT's keys are svdkit's fields: nothing renamed
        config = LoRAConfig.from_dict(data)
    assert config.exclude_modules == ("lm_head",)
    assert LoRAConfig.from_dict({**data, "exclude_modules": None}).exclude_modules == ()  # PEFT's default
    assert config.r == 16 and config.lora_alpha == 32 and config.lora_dropout == 0.05 and config.use_rslora
    assert set(config.target_modules) == {"q_proj", "v_proj"}
    assert config.rank_pattern == {r"layers\.0\..*": 4} and config.alpha_pattern == {"v_proj": 8}
    assert (config.init_lora_weights, config.svd_method, config.n_iter) == ("pissa", "randomized", 16)
    with pytest.raises(ValueError, match="uses use_dora=True, which svdkit does not implement"):
        LoRAConfig.from_dict({**data, "use_dora": True})
    with pytest.raises(ValueError, match="not a LoRA config"):
        LoRAConfig.from_dict({**data, "peft_type": "IA3"})
    assert LoRAConfig.from_dict({**data, "some_future_option": None}) == config  # PEFT drops unknown keys too
    with pytest.raises(ValueError, match="unknown LoRAConfig field"):
        LoRAConfig.from_dict({"r": 4, "lora_alpah": 8})  # without peft_type the dict is svdkit's own: strict


def test_rank_specs_round_trip_through_json():
    config = LoRAConfig(r=Energy(0.9), rank_pattern={"fc1": ErrorTol(0.2), "head": 2}, init_lora_weights="pissa")
    data = json.loads(json.dumps(config.to_dict()))
    assert data["r"] == {"kind": "energy", "value": 0.9}
    assert LoRAConfig.from_dict(data) == config
    with pytest.raises(ValueError, match=r"LoRAConfig.r must be an int >= 1 or a rank spec"):
        LoRAConfig(r="16")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        LoRAConfig(rank_pattern={"fc[": 2})


def _numpy_energy_rank(s: np.ndarray, fraction: float) -> int:
    cumulative = np.cumsum(s**2) / np.sum(s**2)
    return int(np.searchsorted(cumulative, fraction - 1e-12) + 1)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=st.integers(2, 24), n=st.integers(2, 24), decay=st.floats(0.3, 3.0), fraction=st.floats(0.3, 0.99), seed=st.integers(0, 2**16))
def test_energy_rank_is_resolved_on_each_weight_spectrum(m, n, decay, fraction, seed):
    rng = np.random.default_rng(seed)
    k = min(m, n)
    U, _ = np.linalg.qr(rng.standard_normal((m, k)))
    V, _ = np.linalg.qr(rng.standard_normal((n, k)))
    s = np.arange(1, k + 1, dtype=float) ** -decay
    cumulative = np.cumsum(s**2) / np.sum(s**2)
    assume(np.min(np.abs(cumulative - fraction)) > 1e-4)  # away from a tie the float32 SVD may break
    layer = nn.Linear(n, m, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy((U * s) @ V.T))
    model = nn.Sequential(layer)
    lora_model = add_lora(model, None, r=Energy(fraction), init_lora_weights="pissa", svd_method="exact")
    assert lora_model[0].rank == _numpy_energy_rank(s, fraction)
    assert lora_model[0].lora_alpha == lora_model[0].rank  # lora_alpha = r per layer when not given
    x = torch.randn(3, n, dtype=torch.float32)
    torch.testing.assert_close(lora_model(x), model(x), rtol=1e-5, atol=1e-5)


def test_shape_specs_and_per_layer_patterns(mlp):
    lora_model = add_lora(mlp, None, r=RankRatio(0.25), rank_pattern={"head": ParamRatio(0.5)})
    assert lora_model.fc1.rank == 6 and lora_model.fc2.rank == 8  # floor(0.25 * min(out, in))
    assert lora_model.head.rank == int(0.5 * 32 * 10 / 42)


def test_svd_delta_rank_follows_the_delta_spectrum_and_eva_the_input_spectrum(mlp):
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(32, 3, generator=g) @ torch.randn(3, 32, generator=g)  # rank 3
    lora_model = add_lora(mlp, r=ErrorTol(1e-4), init_lora_weights="svd_delta", deltas={"fc2": delta})
    assert lora_model.fc2.rank == 3
    # inputs living in a 5-dimensional subspace: the input spectrum has 5 non-zero values
    X = torch.randn(200, 5, generator=g) @ torch.randn(5, 24, generator=g)
    eva = add_lora(mlp, ["fc1"], r=Energy(0.999999), init_lora_weights="eva", calibration=[X])
    s = np.linalg.svd(X.double().numpy(), compute_uv=False)
    assert eva.fc1.rank == _numpy_energy_rank(s, 0.999999) == 5


def test_rank_pattern_regex_keys_are_honoured_as_peft_does(make_decoder):
    peft = pytest.importorskip("peft")
    base = make_decoder("llama")
    pattern = {r"layers\.0\.self_attn\.(q|k)_proj": 2, "down_proj": 3}
    ours = add_lora(base, ["q_proj", "k_proj", "down_proj"], r=4, rank_pattern=pattern)
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "down_proj"], rank_pattern=pattern)
    )
    peft_ranks = {
        name[len("base_model.model."):]: module.r["default"]
        for name, module in theirs.named_modules() if hasattr(module, "r") and "default" in getattr(module, "r", {})
    }
    assert {name: layer.rank for name, layer in lora_layers(ours)} == peft_ranks
    assert peft_ranks["layers.0.self_attn.q_proj"] == 2 and peft_ranks["layers.1.self_attn.q_proj"] == 4


@pytest.mark.parametrize("old", ["rank", "alpha", "init", "targets", "dropout", "exclude", "aliases"])
def test_the_functions_refuse_the_earlier_keyword_names(mlp, old):
    tuned = copy.deepcopy(mlp)
    with torch.no_grad():
        tuned.fc2.weight.add_(0.1 * torch.randn(32, 2) @ torch.randn(2, 32))
    calls = {
        "add_lora": lambda **kw: add_lora(mlp, None, **kw),
        "extract_lora": lambda **kw: extract_lora(mlp, tuned, **kw),
        "weight_deltas": lambda **kw: weight_deltas(mlp, tuned, **kw),
        "analyze_deltas": lambda **kw: analyze_deltas(mlp, tuned, **kw),
        "select_lora_targets": lambda **kw: select_lora_targets(mlp, **kw),
        "wrap_lora": lambda **kw: wrap_lora(mlp.fc1, 2, 2.0, **kw),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=f"unexpected keyword argument '{old}'"):
            call(**{old: 2})


def test_add_lora_and_extract_lora_take_peft_names(mlp):
    a = add_lora(mlp, ["fc1"], r=3, lora_alpha=6, init_lora_weights="pissa")
    b = apply_lora(mlp, LoRAConfig(target_modules=["fc1"], r=3, lora_alpha=6, init_lora_weights="pissa"))
    assert (a.fc1.rank, a.fc1.lora_alpha) == (b.fc1.rank, b.fc1.lora_alpha) == (3, 6.0)
    assert [n for n, _ in lora_layers(add_lora(mlp, None, r=2, exclude_modules=["fc1"]))] == ["fc2", "head"]
    tuned = copy.deepcopy(mlp)
    with torch.no_grad():
        tuned.fc2.weight.add_(0.1 * torch.randn(32, 2) @ torch.randn(2, 32))
    _, report = extract_lora(mlp, tuned, r=2, target_modules=["fc2"], lora_alpha=4)
    assert report.layers[0].lora_alpha == 4.0 and report.layers[0].rank == 2


def test_apply_lora_with_a_peft_named_config(mlp):
    config = LoRAConfig(r=3, lora_alpha=3, target_modules=["fc1", "head"], init_lora_weights="pissa")
    assert [n for n, _ in lora_layers(apply_lora(mlp, config))] == ["fc1", "head"]
