"""add_lora and the init registry: invariants of each init, freezing, copying, state dicts, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from svdkit.calibrate import collect_input_stats
from svdkit.linalg import layer_seed
from svdkit.lora import (
    LoRAConfig,
    LoRALayer,
    add_lora,
    apply_lora,
    available_inits,
    get_init,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    merge_and_unload,
    merge_lora,
    register_init,
    unmerge_lora,
    unregister_init,
)


pytestmark = pytest.mark.usefixtures("one_thread")


class MLP(nn.Module):
    def __init__(self, d_in: int = 24, hidden: int = 32, d_out: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(-2, -1)))


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return MLP().eval()


@pytest.fixture(scope="module")
def gpt2():
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2Model(config).eval()


@pytest.fixture(scope="module")
def llama(make_decoder):
    return make_decoder("llama")


def _ids():
    return torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(3))


def _rel_dev(y, y0):
    return float((y - y0).abs().max() / y0.abs().max())


def test_registry_lists_the_five_inits():
    assert {"gaussian", "pissa", "milora", "svd_delta", "eva"} <= set(available_inits())
    assert get_init("pissa").moves_weight and get_init("milora").moves_weight
    assert not get_init("gaussian").moves_weight
    assert not get_init("milora").randomized
    with pytest.raises(ValueError, match="unknown LoRA init 'olora'"):
        get_init("olora")


@pytest.mark.parametrize("model_name", ["gpt2", "llama"])
@pytest.mark.parametrize("init, svd", [("gaussian", "auto"), ("pissa", "exact"), ("pissa", "randomized"), ("milora", "exact")])
def test_inits_leave_outputs_unchanged(request, model_name, init, svd):
    model = request.getfixturevalue(model_name)
    ids = _ids()
    with torch.no_grad():
        y0 = model(ids).last_hidden_state
        lora_model = add_lora(model, None, r=4, lora_alpha=8, init_lora_weights=init, svd_method=svd)
        y = lora_model(ids).last_hidden_state
    assert len(lora_layers(lora_model)) == (8 if model_name == "gpt2" else 14)
    assert _rel_dev(y, y0) <= 1e-5


def test_pissa_adapter_is_the_principal_part(mlp):
    W = mlp.fc2.weight.detach().clone()
    lora_model = add_lora(mlp, ["fc2"], r=5, lora_alpha=10, init_lora_weights="pissa", svd_method="exact")
    layer = lora_model.fc2
    U, S, Vh = torch.linalg.svd(W.double())
    principal = (U[:, :5] * S[:5]) @ Vh[:5]
    torch.testing.assert_close(layer.delta_weight().double(), principal, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.base_layer.weight.detach().double(), W.double() - principal, rtol=0, atol=1e-5)
    # A = sqrt(S/s) Vh has orthogonal rows with norms sqrt(S/s)
    B, A = layer.factors()
    torch.testing.assert_close((A @ A.T).diag().double(), S[:5] / layer.scaling, rtol=1e-5, atol=1e-6)
    assert layer.moved_weight
    torch.testing.assert_close(layer.lora_A_init, A.detach())


def test_randomized_pissa_captures_the_exact_subspace_on_a_decaying_spectrum():
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(300, 300))
    V, _ = torch.linalg.qr(torch.randn(200, 200))
    S = torch.arange(1, 201, dtype=torch.float32) ** -1.0
    model = nn.Sequential(nn.Linear(200, 300, bias=False))
    with torch.no_grad():
        model[0].weight.copy_((U[:, :200] * S) @ V.T)
    exact = add_lora(model, None, r=8, init_lora_weights="pissa", svd_method="exact")[0]
    fast = add_lora(model, None, r=8, init_lora_weights="pissa", svd_method="randomized")[0]
    torch.testing.assert_close(fast.delta_weight(), exact.delta_weight(), rtol=0, atol=1e-4)


def test_milora_adapter_is_the_minor_part(mlp):
    W = mlp.fc2.weight.detach().clone()
    layer = add_lora(mlp, ["fc2"], r=3, init_lora_weights="milora").fc2
    U, S, Vh = torch.linalg.svd(W.double())
    minor = (U[:, -3:] * S[-3:]) @ Vh[-3:]
    torch.testing.assert_close(layer.delta_weight().double(), minor, rtol=0, atol=1e-5)
    assert float(layer.delta_weight().norm()) < 0.5 * float((U[:, :3] * S[:3] @ Vh[:3]).norm())


def test_milora_refuses_randomized_svd():
    with pytest.raises(ValueError, match="svd_method='randomized' does not apply to init 'milora'"):
        LoRAConfig(init_lora_weights="milora", svd_method="randomized")


def test_gaussian_init_is_seeded_with_zero_b(mlp):
    a = add_lora(mlp, None, r=4, init_lora_weights="gaussian", seed=7)
    b = add_lora(mlp, None, r=4, init_lora_weights="gaussian", seed=7)
    c = add_lora(mlp, None, r=4, init_lora_weights="gaussian", seed=8)
    A = a.fc1.lora_A.weight.detach()
    torch.testing.assert_close(A, b.fc1.lora_A.weight, rtol=0, atol=0)
    assert not torch.equal(A, c.fc1.lora_A.weight)
    assert not torch.equal(A, a.fc2.lora_A.weight.detach()[:, :24])  # layers draw different values
    assert torch.count_nonzero(a.fc1.lora_B.weight) == 0
    assert float(A.std()) == pytest.approx(1 / 4, rel=0.25)
    for seed in (7, -3):  # layer i draws from svdkit.linalg.layer_seed(seed, i), negative seeds too
        model = add_lora(mlp, None, r=4, init_lora_weights="gaussian", seed=seed)
        for index, (name, layer) in enumerate(lora_layers(model)):
            generator = torch.Generator().manual_seed(layer_seed(seed, index))
            expected = torch.randn(layer.lora_A.weight.shape, generator=generator, dtype=torch.float64) / 4
            torch.testing.assert_close(layer.lora_A.weight, expected.float(), rtol=0, atol=0)


def test_svd_delta_is_the_best_rank_r_approximation(mlp):
    torch.manual_seed(1)
    delta = torch.randn(32, 32)
    lora_model = add_lora(mlp, r=6, lora_alpha=3, init_lora_weights="svd_delta", deltas={"fc2": delta})
    assert [n for n, _ in lora_layers(lora_model)] == ["fc2"]
    U, S, Vh = torch.linalg.svd(delta.double())
    best = (U[:, :6] * S[:6]) @ Vh[:6]
    torch.testing.assert_close(lora_model.fc2.delta_weight().double(), best, rtol=0, atol=1e-5)
    # the base is untouched: outputs move by exactly the rank-6 change
    x = torch.randn(5, 24)
    reference = copy.deepcopy(mlp)
    with torch.no_grad():
        reference.fc2.weight.add_(best.float())
    torch.testing.assert_close(lora_model(x), reference(x), rtol=1e-5, atol=1e-5)


def test_svd_delta_needs_a_delta_for_every_layer(mlp):
    with pytest.raises(ValueError, match="missing: fc1"):
        add_lora(mlp, ["fc1", "fc2"], r=2, init_lora_weights="svd_delta", deltas={"fc2": torch.zeros(32, 32)})
    with pytest.raises(ValueError, match="shape"):
        add_lora(mlp, ["fc2"], r=2, init_lora_weights="svd_delta", deltas={"fc2": torch.zeros(32, 24)})


def test_eva_uses_the_top_right_singular_vectors_of_the_inputs(mlp):
    torch.manual_seed(2)
    batches = [torch.randn(40, 24) @ torch.diag(torch.linspace(3, 0.1, 24)) for _ in range(3)]
    y0 = mlp(batches[0])
    lora_model = add_lora(mlp, None, r=4, init_lora_weights="eva", calibration=batches)
    torch.testing.assert_close(lora_model(batches[0]), y0, rtol=0, atol=0)  # B = 0
    X = torch.cat(batches).double()
    _, _, Vh = torch.linalg.svd(X, full_matrices=False)
    A = lora_model.fc1.lora_A.weight.detach().double()
    torch.testing.assert_close(A @ A.T, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-5)
    # same subspace as the top-4 right singular vectors of the stacked inputs
    torch.testing.assert_close((A @ Vh[:4].T).abs().sum(dim=1), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-4)
    assert torch.count_nonzero(lora_model.fc1.lora_B.weight) == 0


def test_eva_accepts_precomputed_stats_and_needs_data(mlp):
    batches = [torch.randn(30, 24)]
    stats = collect_input_stats(mlp, [("fc1", mlp.fc1)], batches)
    lora_model = add_lora(mlp, ["fc1"], r=2, init_lora_weights="eva", input_stats=stats)
    assert lora_model.fc1.rank == 2
    with pytest.raises(ValueError, match="needs calibration data"):
        add_lora(mlp, ["fc1"], r=2, init_lora_weights="eva")


def test_conv2d_pissa_and_eva_keep_outputs():
    torch.manual_seed(0)
    model = ConvNet().eval()
    x = torch.randn(2, 3, 8, 8)
    y0 = model(x)
    for init in ("pissa", "eva"):
        lora_model = add_lora(model, None, r=3, init_lora_weights=init, calibration=[x])
        assert isinstance(lora_model.conv, LoRALayer)
        torch.testing.assert_close(lora_model(x), y0, rtol=1e-5, atol=1e-5)


def test_add_lora_copies_by_default_and_is_inplace_on_request(mlp):
    W = mlp.fc1.weight.detach().clone()
    lora_model = add_lora(mlp, None, r=4, init_lora_weights="pissa")
    assert lora_model is not mlp and isinstance(mlp.fc1, nn.Linear)
    torch.testing.assert_close(mlp.fc1.weight.detach(), W, rtol=0, atol=0)
    assert all(p.requires_grad for p in mlp.parameters())
    same = add_lora(mlp, None, r=4, init_lora_weights="pissa", inplace=True)
    assert same is mlp and isinstance(mlp.fc1, LoRALayer)
    assert not torch.equal(mlp.fc1.base_layer.weight.detach(), W)


def test_only_adapters_are_trainable_and_gradients_flow(mlp):
    lora_model = add_lora(mlp, None, r=4, init_lora_weights="pissa")
    trainable = {n for n, p in lora_model.named_parameters() if p.requires_grad}
    assert trainable == {f"{layer}.lora_{ab}.weight" for layer in ("fc1", "fc2", "head") for ab in "AB"}
    lora_model(torch.randn(3, 24)).square().sum().backward()
    assert lora_model.fc1.lora_A.weight.grad is not None
    assert lora_model.fc1.base_layer.weight.grad is None


def test_adapter_state_dict_saves_and_loads(tmp_path, mlp):
    from safetensors.torch import load_file, save_file

    lora_model = add_lora(mlp, None, r=4, init_lora_weights="pissa", seed=3)
    with torch.no_grad():
        for _, layer in lora_layers(lora_model):
            layer.lora_B.weight.add_(0.1)
    state = lora_state_dict(lora_model)
    assert set(state) == {f"{l}.{k}" for l in ("fc1", "fc2", "head") for k in ("lora_A.weight", "lora_B.weight", "lora_A_init", "lora_B_init")}
    save_file(state, tmp_path / "adapter.safetensors")
    fresh = add_lora(mlp, None, r=4, init_lora_weights="pissa", seed=3)
    load_lora_state_dict(fresh, load_file(tmp_path / "adapter.safetensors"))
    x = torch.randn(4, 24)
    torch.testing.assert_close(fresh(x), lora_model(x), rtol=0, atol=0)


def test_load_state_dict_rejects_mismatches(mlp):
    lora_model = add_lora(mlp, None, r=4)
    state = lora_state_dict(add_lora(mlp, None, r=2))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_lora_state_dict(lora_model, state)
    with pytest.raises(ValueError, match="unexpected keys: other.lora_A.weight"):
        load_lora_state_dict(lora_model, {**lora_state_dict(lora_model), "other.lora_A.weight": torch.zeros(1)})


def test_merge_unmerge_and_unload_on_a_model(mlp):
    torch.manual_seed(0)
    lora_model = add_lora(mlp, None, r=4, init_lora_weights="gaussian")
    with torch.no_grad():
        for _, layer in lora_layers(lora_model):
            layer.lora_B.weight.normal_()
    x = torch.randn(6, 24)
    y = lora_model(x)
    merge_lora(lora_model)
    torch.testing.assert_close(lora_model(x), y, rtol=1e-5, atol=1e-5)
    unmerge_lora(lora_model)
    plain = merge_and_unload(lora_model)
    assert type(plain.fc1) is nn.Linear and isinstance(lora_model.fc1, LoRALayer)
    torch.testing.assert_close(plain(x), y, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_safe_checks_before_writing(mlp):
    lora_model = add_lora(mlp, None, r=2)
    with torch.no_grad():
        lora_model.head.lora_A.weight.fill_(float("nan"))
        lora_model.head.lora_B.weight.fill_(1.0)
    W = lora_model.fc1.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="'head' would write non-finite"):
        merge_and_unload(lora_model, safe=True, inplace=True)
    assert not lora_model.fc1.merged
    torch.testing.assert_close(lora_model.fc1.base_layer.weight.detach(), W, rtol=0, atol=0)


def test_targets_follow_peft_semantics(gpt2):
    names = lambda m: [n for n, _ in lora_layers(m)]  # noqa: E731
    assert names(add_lora(gpt2, ["c_attn"], r=2)) == ["h.0.attn.c_attn", "h.1.attn.c_attn"]
    assert names(add_lora(gpt2, r"h\.1\..*c_fc", r=2)) == ["h.1.mlp.c_fc"]
    assert len(names(add_lora(gpt2, "all-linear", r=2, exclude_modules=["c_proj"]))) == 4
    with pytest.raises(ValueError, match="no Linear, Conv1D or Conv2d layer"):
        add_lora(gpt2, ["nope"], r=2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"r": 40}, "rank 40 exceeds min\\(out, in\\) = 24 of layer 'fc1'"),
        ({"r": 4, "lora_alpha": 0}, r"LoRAConfig.lora_alpha must be a finite number > 0"),
        ({"r": 4, "lora_alpha": -2.0}, "LoRAConfig.lora_alpha"),
        ({"r": 0}, r"LoRAConfig.r must be an int >= 1 or a rank spec such as Energy\(0.9\), got 0"),
        ({"r": 4, "lora_dropout": 1.5}, "LoRAConfig.lora_dropout"),
        ({"r": 4, "svd_method": "fast"}, "LoRAConfig.svd_method must be one of"),
        ({"r": 4, "init_lora_weights": "olora"}, "unknown LoRA init 'olora'"),
        ({"r": 4, "rank_pattern": {"fc1": 0}}, r"LoRAConfig.rank_pattern\['fc1'\]"),
        ({"r": 4, "rank_pattern": {"fc_1": 2}}, r"rank_pattern: 1 key\(s\) match none of the 3 selected layers: 'fc_1' \(did you mean 'fc1'"),
        ({"r": 4, "alpha_pattern": {"heads": 2.0}}, r"alpha_pattern: .*'heads' \(did you mean 'head'"),
    ],
)
def test_bad_input_gives_clear_errors_and_modifies_nothing(mlp, kwargs, match):
    before = copy.deepcopy(mlp.state_dict())
    with pytest.raises(ValueError, match=match):
        add_lora(mlp, None, inplace=True, **kwargs)
    assert isinstance(mlp.fc1, nn.Linear)
    for key, value in mlp.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_adding_twice_is_refused(mlp):
    lora_model = add_lora(mlp, None, r=2)
    with pytest.raises(ValueError, match="already has 3 LoRA layer"):
        add_lora(lora_model, None, r=2)


def test_rank_and_alpha_patterns(mlp):
    lora_model = add_lora(mlp, None, r=4, lora_alpha=8, rank_pattern={"head": 2}, alpha_pattern={"fc2": 1.0})
    assert (lora_model.fc1.rank, lora_model.fc1.lora_alpha) == (4, 8.0)
    assert (lora_model.head.rank, lora_model.head.lora_alpha) == (2, 8.0)
    assert (lora_model.fc2.rank, lora_model.fc2.lora_alpha) == (4, 1.0)


def test_config_round_trips_through_json():
    import json

    config = LoRAConfig(r=4, lora_alpha=8, init_lora_weights="pissa", target_modules=["q", "v"], rank_pattern={"q": 2})
    assert config.target_modules == ("q", "v")
    again = LoRAConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    with pytest.raises(ValueError, match="unknown LoRAConfig field"):
        LoRAConfig.from_dict({"rank": 4, "lora_alpah": 8})


def test_apply_lora_with_a_config_object(mlp):
    config = LoRAConfig(r=3, init_lora_weights="pissa", target_modules=("fc1",))
    lora_model = apply_lora(mlp, config)
    assert [n for n, _ in lora_layers(lora_model)] == ["fc1"]
    with pytest.raises(TypeError, match="LoRAConfig"):
        apply_lora(mlp, {"rank": 3})


@pytest.fixture
def ones_init():
    """A test init, registered for one test and removed from the registry afterwards (checked)."""
    before = list(available_inits())

    @register_init("test_ones")
    def ones(layer, ctx):
        B, A = layer.factors()
        layer.set_factors(torch.zeros_like(B), torch.ones_like(A))

    yield "test_ones"
    unregister_init("test_ones")
    assert list(available_inits()) == before


def test_custom_init_is_one_registered_function(mlp, ones_init):
    lora_model = add_lora(mlp, None, r=2, init_lora_weights=ones_init)
    assert torch.all(lora_model.fc1.lora_A.weight == 1)
    assert ones_init in available_inits()

