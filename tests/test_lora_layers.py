"""LoRA wrappers: forward, merge/unmerge, safe merge, dtypes, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from svdkit.layers.lora import LoRAConv1D, LoRAConv2d, LoRALinear, lora_wrapper_class, wrap_lora
from svdkit.views import set_weight_matrix, weight_matrix


pytestmark = pytest.mark.usefixtures("one_thread")


def _conv1d(nx: int, nf: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(1)
    layer = Conv1D(nf, nx)
    nn.init.normal_(layer.weight, std=0.2)
    nn.init.normal_(layer.bias, std=0.1)
    return layer


def _filled(layer, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, A = layer.factors()
    A0 = torch.randn(A.shape, generator=g)
    layer.set_factors(torch.randn(B.shape, generator=g), A0)
    return layer


CASES = {
    "linear": (lambda: nn.Linear(12, 7), lambda: torch.randn(3, 5, 12)),
    "conv1d": (lambda: _conv1d(12, 7), lambda: torch.randn(3, 5, 12)),
    "conv2d": (lambda: nn.Conv2d(3, 6, 3, stride=2, padding=1), lambda: torch.randn(2, 3, 9, 9)),
}


@pytest.fixture(params=sorted(CASES))
def case(request):
    torch.manual_seed(0)
    make_layer, make_input = CASES[request.param]
    return request.param, make_layer(), make_input()


def test_wrapper_class_follows_the_view_kind(case):
    kind, base, _ = case
    cls = lora_wrapper_class(base)
    assert cls.kind == kind
    assert {"linear": LoRALinear, "conv1d": LoRAConv1D, "conv2d": LoRAConv2d}[kind] is cls


def test_zero_adapter_is_the_base_layer_and_keeps_it(case):
    _, base, x = case
    expected = base(x)
    layer = wrap_lora(base, 2, 4.0)
    assert layer.base_layer is base
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


def test_forward_adds_scaled_low_rank_update(case):
    _, base, x = case
    layer = _filled(wrap_lora(base, 2, 3.0))
    assert layer.scaling == pytest.approx(1.5)
    B, A = layer.factors()
    reference = copy.deepcopy(base)
    set_weight_matrix(reference, weight_matrix(base).detach() + 1.5 * B.detach() @ A.detach())
    torch.testing.assert_close(layer(x), reference(x), rtol=1e-5, atol=1e-5)


def test_merge_then_unmerge_is_the_identity(case):
    _, base, x = case
    W0 = weight_matrix(base).detach().clone()
    layer = _filled(wrap_lora(base, 3, 6.0))
    y = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight_matrix(base).detach(), W0 + layer.delta_weight(), rtol=1e-6, atol=1e-6)
    layer.merge()  # idempotent
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(weight_matrix(base).detach(), W0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_returns_the_merged_base(case):
    _, base, x = case
    layer = _filled(wrap_lora(base, 2, 2.0))
    y = layer(x)
    plain = layer.merge_and_unload()
    assert plain is base
    torch.testing.assert_close(plain(x), y, rtol=1e-5, atol=1e-5)


def test_safe_merge_refuses_non_finite_and_leaves_the_base(case):
    _, base, _ = case
    layer = _filled(wrap_lora(base, 2, 2.0))
    with torch.no_grad():
        layer.lora_B.weight.view(-1)[0] = float("inf")
    W0 = weight_matrix(base).detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge(safe=True)
    assert not layer.merged
    torch.testing.assert_close(weight_matrix(base).detach(), W0, rtol=0, atol=0)


def test_safe_merge_catches_overflow_of_a_half_weight():
    base = nn.Linear(4, 4).to(torch.float16)
    layer = wrap_lora(base, 1, 1.0)
    layer.set_factors(torch.full((4, 1), 300.0), torch.full((1, 4), 300.0))  # 9e4 > fp16 max
    with pytest.raises(ValueError, match="overflows"):
        layer.merge(safe=True)


def test_half_base_merges_in_float32_and_casts_back():
    torch.manual_seed(0)
    base = nn.Linear(16, 8).to(torch.bfloat16)
    W0 = base.weight.detach().clone()
    layer = _filled(wrap_lora(base, 2, 2.0))
    assert layer.lora_A.weight.dtype == torch.float32  # adapters stay in float32
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16
    expected = (W0.float() + layer.delta_weight()).to(torch.bfloat16)
    layer.merge()
    assert base.weight.dtype == torch.bfloat16
    torch.testing.assert_close(base.weight.detach(), expected, rtol=0, atol=0)


def test_float64_base_merges_in_float64():
    base = nn.Linear(6, 5).double()
    W0 = base.weight.detach().clone()
    layer = _filled(wrap_lora(base, 2, 2.0))
    layer.merge()
    layer.unmerge()
    torch.testing.assert_close(base.weight.detach(), W0, rtol=0, atol=1e-13)


def test_rslora_scaling():
    layer = wrap_lora(nn.Linear(8, 8), 4, 8.0, use_rslora=True)
    assert layer.scaling == pytest.approx(8 / math.sqrt(4))


def test_dropout_only_touches_the_adapter_path():
    torch.manual_seed(0)
    base = nn.Linear(10, 10)
    layer = _filled(wrap_lora(base, 2, 2.0, lora_dropout=0.5))
    x = torch.randn(64, 10)
    layer.eval()
    y_eval = layer(x)
    layer.train()
    y_train = layer(x)
    assert not torch.allclose(y_eval, y_train)
    layer.set_factors(torch.zeros(10, 2), torch.zeros(2, 10))
    torch.testing.assert_close(layer(x), base(x))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"r": 9, "lora_alpha": 1.0}, "rank 9 exceeds min"),
        ({"r": 0, "lora_alpha": 1.0}, r"r \(the adapter rank\) must be an int >= 1"),
        ({"r": 2, "lora_alpha": 0.0}, "lora_alpha must be a finite number > 0"),
        ({"r": 2, "lora_alpha": -1.0}, "lora_alpha must be a finite number > 0"),
        ({"r": 2, "lora_alpha": float("nan")}, "lora_alpha"),
        ({"r": 2, "lora_alpha": 1.0, "lora_dropout": 1.0}, "lora_dropout"),
    ],
)
def test_bad_wrapper_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        wrap_lora(nn.Linear(8, 20), **kwargs)


def test_unsupported_layers_raise():
    with pytest.raises(TypeError, match="no LoRA wrapper"):
        wrap_lora(nn.Embedding(10, 4), 2, 2.0)
    with pytest.raises(ValueError, match="grouped"):
        wrap_lora(nn.Conv2d(4, 4, 3, groups=2), 2, 2.0)


def test_set_factors_checks_shapes():
    layer = wrap_lora(nn.Linear(6, 5), 2, 2.0)
    with pytest.raises(ValueError, match="factors for a rank-2 adapter"):
        layer.set_factors(torch.zeros(2, 5), torch.zeros(5, 2))  # (A, B): the wrong order


def test_conv2d_adapter_matches_its_matrix_view():
    torch.manual_seed(0)
    base = nn.Conv2d(3, 5, 3, padding=1, bias=False)
    layer = _filled(wrap_lora(base, 2, 2.0))
    x = torch.randn(2, 3, 6, 6)
    delta_kernel = layer.delta_weight().reshape(base.weight.shape)
    expected = nn.functional.conv2d(x, base.weight + delta_kernel, padding=1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert layer.lora_A.weight.shape == (2, 3, 3, 3)
    assert layer.lora_B.weight.shape == (5, 2, 1, 1)
