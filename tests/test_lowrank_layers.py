"""Invariants of the factorized layers: LowRankLinear, LowRankConv2d and LowRankEmbedding.

- at full rank the factorized layer computes what the dense layer computes;
- ``to_dense(from_dense(L))`` gives back ``L`` (same type, geometry, bias, dtype, device);
- an exactly rank-``r`` weight is recovered exactly at rank ``r``;
- ``forward`` runs the two thin factors and never rebuilds the dense weight;
- ``weight`` is the dense weight the layer computes, in its source's layout, so code written for
  the dense layer that reads it (ViT, T5) runs;
- the truncation error is the Eckart-Young tail of the singular values (checked against NumPy);
- bad input fails with an error that says what is wrong.
"""

from __future__ import annotations

import copy
import importlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from svdkit.layers.lowrank import LowRankConv2d, LowRankEmbedding, LowRankLayer, LowRankLinear
from svdkit.linalg import ErrorTol, ParamRatio

Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Conv2d geometries the factorization must keep: (kwargs, input height, input width).
CONV_CASES = {
    "stride2-pad1-dil2": (dict(in_channels=6, out_channels=10, kernel_size=3, stride=2, padding=1, dilation=2), 11, 13),
    "groups": (dict(in_channels=8, out_channels=12, kernel_size=3, padding=1, groups=4), 9, 9),
    "reflect": (dict(in_channels=5, out_channels=7, kernel_size=3, padding=1, padding_mode="reflect"), 8, 10),
    "circular-groups-stride": (
        dict(in_channels=6, out_channels=9, kernel_size=3, stride=(1, 2), padding=2, padding_mode="circular", groups=3), 7, 9,
    ),
    "non-square": (dict(in_channels=4, out_channels=9, kernel_size=(1, 5), padding=(0, 2)), 6, 12),
    "same": (dict(in_channels=5, out_channels=8, kernel_size=3, padding="same"), 7, 7),
    "same-even-dilated": (dict(in_channels=4, out_channels=6, kernel_size=(2, 4), padding="same", dilation=2), 9, 10),
    "no-bias": (dict(in_channels=3, out_channels=5, kernel_size=2, bias=False), 6, 6),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _conv(case: str, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0) -> tuple[nn.Conv2d, torch.Tensor]:
    kwargs, h, w = CONV_CASES[case]
    torch.manual_seed(seed)
    conv = nn.Conv2d(**kwargs).to(device, dtype)
    x = torch.randn(2, kwargs["in_channels"], h, w, device=device, dtype=dtype)
    return conv, x


def _full_rank(conv: nn.Conv2d) -> int:
    kh, kw = conv.kernel_size
    g = conv.groups
    return min(conv.out_channels // g, conv.in_channels // g * kh * kw)


def _group_blocks(conv: nn.Conv2d) -> np.ndarray:
    """The (groups, C_out/g, C_in/g*kh*kw) matrices, computed independently of svdkit."""
    W = conv.weight.detach().double().numpy()
    return W.reshape(conv.groups, conv.out_channels // conv.groups, -1)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float = 1e-5) -> None:
    """Agreement to ``rtol`` of the expected tensor's largest magnitude (fp32 tolerance by default)."""
    scale = float(expected.detach().abs().max()) or 1.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=rtol * scale)


# ---------------------------------------------------------------------------------------------
# ``weight``: the dense weight the layer computes, for code written for the dense layer
# ---------------------------------------------------------------------------------------------


@FAST
@given(m=st.integers(1, 12), n=st.integers(1, 12), conv1d=st.booleans(), bias=st.booleans(), data=st.data())
def test_linear_weight_is_what_the_layer_computes(m, n, conv1d, bias, data):
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    dense = Conv1D(m, n) if conv1d else nn.Linear(n, m, bias=bias)
    low = LowRankLinear.from_dense(dense, data.draw(st.integers(1, min(m, n))))
    x = torch.randn(3, n)
    W = low.weight
    assert W.shape == dense.weight.shape and W.dtype == dense.weight.dtype and W.device == dense.weight.device
    # the dense layer's own arithmetic with this weight: Conv1D is x @ W + b with W (in, out)
    expected = x @ W + low.bias if conv1d else nn.functional.linear(x, W, low.bias)
    _assert_close(expected, low(x))


@FAST
@given(
    groups=st.sampled_from([1, 2, 3]), cin_per_group=st.integers(1, 4), cout_per_group=st.integers(1, 5),
    kh=st.integers(1, 3), kw=st.integers(1, 3), stride=st.integers(1, 2), padding_mode=st.sampled_from(["zeros", "reflect"]),
    bias=st.booleans(), data=st.data(),
)
def test_conv2d_weight_is_what_the_layer_computes(groups, cin_per_group, cout_per_group, kh, kw, stride, padding_mode, bias, data):
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    conv = nn.Conv2d(groups * cin_per_group, groups * cout_per_group, (kh, kw), stride=stride, padding=1, groups=groups,
                     bias=bias, padding_mode=padding_mode)
    low = LowRankConv2d.from_dense(conv, data.draw(st.integers(1, _full_rank(conv))))
    x = torch.randn(2, groups * cin_per_group, 6, 7)
    W = low.weight
    assert W.shape == conv.weight.shape and W.dtype == conv.weight.dtype
    # nn.Conv2d's own forward (padding mode, stride, groups) with this kernel
    _assert_close(conv._conv_forward(x, W, low.expand.bias), low(x))


def test_weight_follows_the_factors_and_carries_their_gradients():
    low = LowRankLinear.from_dense(nn.Linear(6, 5), 2)
    with torch.no_grad():
        low.u.mul_(2)
    torch.testing.assert_close(low.weight, low.u @ low.v)
    low.weight.square().sum().backward()  # the factors require gradients: autograd sees the product
    torch.testing.assert_close(low.u.grad, 2 * (low.u @ low.v) @ low.v.T)
    with pytest.raises(KeyError, match="already exists"):  # nn.Module refuses: a product, not a parameter
        low.weight = nn.Parameter(torch.zeros(5, 6))


@pytest.mark.parametrize("build", [lambda: LowRankLinear.from_dense(nn.Linear(64, 48), 4),
                                   lambda: LowRankLinear.from_dense(Conv1D(48, 64), 4),
                                   lambda: LowRankConv2d.from_dense(nn.Conv2d(6, 8, 3, groups=2), 2)])
def test_reading_the_weight_s_metadata_multiplies_nothing(build, monkeypatch):
    """T5 checks ``wo.weight.dtype`` three times a call: in inference that must cost no product."""
    low = build().requires_grad_(False)
    products = []
    real = type(low).dense_weight
    monkeypatch.setattr(type(low), "dense_weight", lambda self: products.append(1) or real(self))
    W = low.weight
    assert isinstance(W, torch.Tensor) and W.dtype == torch.float32 and W.device.type == "cpu" and W.ndim in (2, 4)
    assert W.dtype != torch.int8 and W.shape[0] > 0
    assert products == []
    values = W * 1  # an operation that reads the values gives the plain product
    assert type(values) is torch.Tensor and len(products) == 1
    torch.testing.assert_close(values, real(low).T if getattr(low, "source_kind", "") == "conv1d" else real(low))
    assert type(copy.deepcopy(W)) is torch.Tensor
    for change in (lambda: W.mul_(2), lambda: nn.init.normal_(W), lambda: W.zero_()):
        with pytest.raises(RuntimeError, match="in place.*change the factors"):
            change()


def _swap_back(model: nn.Module) -> nn.Module:
    """``model`` with every factorized layer replaced by its ``to_dense()`` (an independent forward)."""
    from svdkit.surgery import replace_module

    dense = copy.deepcopy(model)
    for name, module in list(dense.named_modules()):
        if isinstance(module, (LowRankLinear, LowRankConv2d)):
            replace_module(dense, name, module.to_dense())
    return dense


def test_models_that_read_a_layer_weight_in_their_forward_run_compressed():
    """ViT reads its patch projection's ``weight.dtype`` and T5 its ``wo.weight`` in their forward."""
    from transformers import T5Config, T5ForConditionalGeneration, ViTConfig, ViTModel

    from svdkit import CompressConfig, compress

    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=16,
                             patch_size=4), add_pooling_layer=False).eval()
    t5 = T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=50)).eval()
    pixels, ids = torch.randn(2, 3, 16, 16), torch.randint(0, 50, (2, 7))
    for model, inputs, factorized in ((vit, {"pixel_values": pixels}, "embeddings.patch_embeddings.projection"),
                                      (t5, {"input_ids": ids, "decoder_input_ids": ids}, "encoder.block.0.layer.1.DenseReluDense.wo")):
        out, _ = compress(model, CompressConfig(method="svd", rank=4))
        layer = out.get_submodule(factorized)
        assert isinstance(layer, LowRankLayer)
        products = []
        layer.dense_weight = lambda: products.append(1)  # an instance attribute: only this layer's calls
        with torch.no_grad():
            got = out(**inputs)[0]
        assert products == []  # the forward read the weight's dtype only: no product
        del layer.dense_weight
        with torch.no_grad():
            expected = _swap_back(out)(**inputs)[0]
        _assert_close(got, expected)


# ---------------------------------------------------------------------------------------------
# Full rank reproduces the dense layer
# ---------------------------------------------------------------------------------------------


@FAST
@given(
    in_features=st.integers(1, 24),
    out_features=st.integers(1, 24),
    bias=st.booleans(),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    seed=st.integers(0, 2**16),
)
def test_linear_full_rank_reproduces_outputs(in_features, out_features, bias, lead, seed):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    x = torch.randn(*lead, in_features)
    low = LowRankLinear.from_dense(linear, min(in_features, out_features))
    assert low.rank == min(in_features, out_features)
    _assert_close(low(x), linear(x))


def test_linear_rank_above_full_is_capped():
    linear = nn.Linear(6, 4)
    assert LowRankLinear.from_dense(linear, 100).rank == 4


@FAST
@given(nx=st.integers(1, 20), nf=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_conv1d_full_rank_reproduces_outputs(nx, nf, seed):
    torch.manual_seed(seed)
    conv1d = Conv1D(nf, nx)
    nn.init.normal_(conv1d.weight)
    nn.init.normal_(conv1d.bias)
    x = torch.randn(2, 3, nx)
    low = LowRankLinear.from_dense(conv1d, min(nx, nf))
    assert (low.in_features, low.out_features) == (nx, nf)
    _assert_close(low(x), conv1d(x))


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv2d_full_rank_reproduces_outputs(case):
    conv, x = _conv(case)
    low = LowRankConv2d.from_dense(conv, _full_rank(conv))
    out = low(x)
    assert out.shape == conv(x).shape
    _assert_close(out, conv(x))


@FAST
@given(
    groups=st.sampled_from([1, 2, 3]),
    cin_per_group=st.integers(1, 4),
    cout_per_group=st.integers(1, 5),
    kh=st.integers(1, 3),
    kw=st.integers(1, 3),
    stride=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.integers(0, 1),
    padding_mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_conv2d_full_rank_reproduces_outputs_any_geometry(
    groups, cin_per_group, cout_per_group, kh, kw, stride, dilation, padding, padding_mode, bias, seed
):
    torch.manual_seed(seed)
    conv = nn.Conv2d(
        groups * cin_per_group, groups * cout_per_group, (kh, kw), stride=stride, padding=padding,
        dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
    )
    x = torch.randn(2, groups * cin_per_group, 7, 8)
    low = LowRankConv2d.from_dense(conv, _full_rank(conv))
    _assert_close(low(x), conv(x))


def test_conv2d_same_padding_with_stride_is_rejected():
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
    conv.padding = "same"  # nn.Conv2d itself refuses this at construction; the layer must too
    with pytest.raises(ValueError, match="same"):
        LowRankConv2d(conv, 1)


# ---------------------------------------------------------------------------------------------
# Round trips: to_dense(from_dense(L)) == L
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_linear_round_trip(bias):
    torch.manual_seed(1)
    linear = nn.Linear(13, 9, bias=bias)
    dense = LowRankLinear.from_dense(linear, 9).to_dense()
    assert type(dense) is nn.Linear
    assert (dense.in_features, dense.out_features) == (13, 9)
    _assert_close(dense.weight, linear.weight)
    if bias:
        torch.testing.assert_close(dense.bias, linear.bias, rtol=0, atol=0)
    else:
        assert dense.bias is None


def test_conv1d_round_trip_returns_conv1d():
    torch.manual_seed(2)
    conv1d = Conv1D(7, 11)
    nn.init.normal_(conv1d.weight)
    nn.init.normal_(conv1d.bias)
    low = LowRankLinear.from_dense(conv1d, 7)
    assert low.source_kind == "conv1d"
    dense = low.to_dense()
    assert isinstance(dense, Conv1D)
    assert dense.nf == 7 and tuple(dense.weight.shape) == (11, 7)
    _assert_close(dense.weight, conv1d.weight)
    torch.testing.assert_close(dense.bias, conv1d.bias, rtol=0, atol=0)
    x = torch.randn(4, 11)
    _assert_close(dense(x), conv1d(x))


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv2d_round_trip_keeps_geometry(case):
    conv, x = _conv(case)
    dense = LowRankConv2d.from_dense(conv, _full_rank(conv)).to_dense()
    assert type(dense) is nn.Conv2d
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
        assert getattr(dense, attr) == getattr(conv, attr), attr
    _assert_close(dense.weight, conv.weight)
    if conv.bias is None:
        assert dense.bias is None
    else:
        torch.testing.assert_close(dense.bias, conv.bias, rtol=0, atol=0)
    _assert_close(dense(x), conv(x))


def test_from_dense_leaves_the_source_untouched():
    torch.manual_seed(3)
    linear, conv = nn.Linear(8, 6), nn.Conv2d(4, 6, 3)
    saved = [p.detach().clone() for p in (*linear.parameters(), *conv.parameters())]
    LowRankLinear.from_dense(linear, 2)
    LowRankConv2d.from_dense(conv, 2)
    for before, after in zip(saved, (*linear.parameters(), *conv.parameters())):
        assert torch.equal(before, after)


# ---------------------------------------------------------------------------------------------
# Exactly low-rank weights are recovered at their rank
# ---------------------------------------------------------------------------------------------


@FAST
@given(m=st.integers(2, 20), n=st.integers(2, 20), data=st.data())
def test_linear_recovers_a_rank_r_weight_exactly(m, n, data):
    r = data.draw(st.integers(1, min(m, n)))
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(n, m)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g))
    low = LowRankLinear.from_dense(linear, r)
    assert low.rank == r
    _assert_close(low.dense_weight(), linear.weight)
    # the tolerance spec finds the rank on its own
    assert LowRankLinear.from_dense(linear, ErrorTol(1e-4)).rank <= r


@pytest.mark.parametrize("groups", [1, 2])
def test_conv2d_recovers_a_rank_r_kernel_exactly(groups):
    g = torch.Generator().manual_seed(4)
    conv = nn.Conv2d(6, 10, (3, 2), padding=1, groups=groups)
    m, n, r = 10 // groups, 6 // groups * 6, 2
    blocks = torch.randn(groups, m, r, generator=g) @ torch.randn(groups, r, n, generator=g)
    with torch.no_grad():
        conv.weight.copy_(blocks.reshape(conv.weight.shape))
    low = LowRankConv2d.from_dense(conv, r)
    assert low.rank == r and low.reduce.out_channels == groups * r
    _assert_close(low.to_dense().weight, conv.weight)
    x = torch.randn(2, 6, 5, 5)
    _assert_close(low(x), conv(x))


# ---------------------------------------------------------------------------------------------
# forward runs the factors, never the dense weight
# ---------------------------------------------------------------------------------------------


def _flops(module: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops()


def _forbid_rebuild(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise AssertionError("forward rebuilt the dense weight")

    for cls in (LowRankLinear, LowRankConv2d, LowRankEmbedding):
        monkeypatch.setattr(cls, "to_dense", refuse)
    for cls in (LowRankLinear, LowRankConv2d):
        monkeypatch.setattr(cls, "dense_weight", refuse)


def test_linear_forward_uses_only_the_factors(monkeypatch):
    m, n, r, batch = 48, 64, 5, 7
    low = LowRankLinear.from_dense(nn.Linear(n, m), r)
    assert sum(p.numel() for p in low.parameters()) == r * (m + n) + m
    assert {name for name, _ in low.named_parameters()} == {"u", "v", "bias"}
    _forbid_rebuild(monkeypatch)
    x = torch.randn(batch, n)
    assert _flops(low, x) == 2 * batch * r * (m + n)  # a rebuilt W would add 2*r*m*n more
    assert _flops(low, x) < 2 * batch * m * n


def test_conv2d_forward_uses_only_the_factors(monkeypatch):
    conv = nn.Conv2d(8, 16, 3, padding=1, groups=2)
    r, g = 3, 2
    low = LowRankConv2d.from_dense(conv, r)
    m, n = 16 // g, 8 // g * 9
    assert sum(p.numel() for p in low.parameters()) == g * r * (m + n) + 16
    _forbid_rebuild(monkeypatch)
    x = torch.randn(2, 8, 10, 10)
    positions = 2 * 10 * 10
    assert _flops(low, x) == 2 * positions * g * r * (m + n)


def test_embedding_forward_uses_only_the_factors(monkeypatch):
    low = LowRankEmbedding.from_dense(nn.Embedding(100, 32), 4)
    assert sum(p.numel() for p in low.parameters()) == 4 * (100 + 32)
    _forbid_rebuild(monkeypatch)
    ids = torch.randint(0, 100, (3, 5))
    assert _flops(low, ids) == 2 * 15 * 4 * 32


# ---------------------------------------------------------------------------------------------
# bias, dtype and device are kept
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_linear_and_conv1d_keep_dtype_device_and_bias(dtype, device):
    torch.manual_seed(5)
    for source in (nn.Linear(12, 8), Conv1D(8, 12)):
        nn.init.normal_(source.bias)
        source = source.to(device, dtype)
        low = LowRankLinear.from_dense(source, 8)
        for p in low.parameters():
            assert p.dtype == dtype and p.device.type == device
        torch.testing.assert_close(low.bias, source.bias, rtol=0, atol=0)
        x = torch.randn(3, 12, device=device, dtype=dtype)
        out = low(x)
        assert out.dtype == dtype and out.device.type == device
        tol = 1e-12 if dtype == torch.float64 else 5e-2
        _assert_close(out.double(), source(x).double(), rtol=tol)
        dense = low.to_dense()
        assert type(dense) is type(source) and dense.weight.dtype == dtype and dense.weight.device.type == device


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_conv2d_keeps_dtype_device_and_bias(dtype, device):
    conv, x = _conv("stride2-pad1-dil2", dtype=dtype, device=device, seed=6)
    low = LowRankConv2d.from_dense(conv, _full_rank(conv))
    for p in low.parameters():
        assert p.dtype == dtype and p.device.type == device
    torch.testing.assert_close(low.expand.bias, conv.bias, rtol=0, atol=0)
    tol = 1e-12 if dtype == torch.float64 else 5e-2
    _assert_close(low(x).double(), conv(x).double(), rtol=tol)
    dense = low.to_dense()
    assert dense.weight.dtype == dtype and dense.weight.device.type == device


def test_from_factors_follows_the_left_factor():
    left = torch.randn(5, 2, dtype=torch.float64)
    dense = nn.Linear(7, 5)
    low = LowRankLinear.from_factors(dense, left, torch.randn(2, 7))
    assert low.u.dtype == low.v.dtype == low.bias.dtype == torch.float64
    torch.testing.assert_close(low.u, left, rtol=0, atol=0)
    torch.testing.assert_close(low.bias, dense.bias.detach().double(), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# extra_repr
# ---------------------------------------------------------------------------------------------


def test_linear_extra_repr_shows_rank_params_and_saving():
    low = LowRankLinear.from_dense(nn.Linear(100, 50), 10)
    text = repr(low)
    assert "rank=10" in text
    assert "params=1,500 vs 5,000 dense (-70%)" in text
    # above break-even the repr says the layer grew
    assert "(+" in repr(LowRankLinear.from_dense(nn.Linear(10, 10), 10))


def test_conv2d_extra_repr_shows_rank_params_and_saving():
    low = LowRankConv2d.from_dense(nn.Conv2d(16, 32, 3), 4)
    dense = 32 * 16 * 9
    factored = 4 * (16 * 9 + 32)
    saving = round(100 * (1 - factored / dense))
    assert f"rank=4, groups=1, params={factored:,} vs {dense:,} dense (-{saving}%)" in repr(low)


def test_embedding_extra_repr_shows_rank_params_and_saving():
    text = repr(LowRankEmbedding.from_dense(nn.Embedding(1000, 64), 8))
    assert "rank=8" in text and re.search(r"params=8,512 vs 64,000 dense \(-87%\)", text)


# ---------------------------------------------------------------------------------------------
# Truncation error is the Eckart-Young tail
# ---------------------------------------------------------------------------------------------


@FAST
@given(m=st.integers(2, 16), n=st.integers(2, 16), data=st.data())
def test_linear_truncation_error_is_the_svd_tail(m, n, data):
    k = data.draw(st.integers(1, min(m, n)))
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    linear = nn.Linear(n, m).double()
    W = linear.weight.detach().numpy()
    s = np.linalg.svd(W, compute_uv=False)
    low = LowRankLinear.from_dense(linear, k)
    error = np.linalg.norm(W - low.dense_weight().detach().numpy())
    np.testing.assert_allclose(error, np.sqrt(np.sum(s[k:] ** 2)), rtol=1e-9, atol=1e-12)
    # the kept spectrum is the leading one
    kept = np.linalg.svd(low.dense_weight().detach().numpy(), compute_uv=False)[:k]
    np.testing.assert_allclose(kept, s[:k], rtol=1e-9, atol=1e-12)


def test_conv1d_truncation_error_is_the_svd_tail():
    torch.manual_seed(7)
    conv1d = Conv1D(9, 14).double()
    nn.init.normal_(conv1d.weight)
    W = conv1d.weight.detach().numpy().T  # (out, in)
    s = np.linalg.svd(W, compute_uv=False)
    for k in (1, 4, 9):
        dense = LowRankLinear.from_dense(conv1d, k).to_dense()
        error = np.linalg.norm(W - dense.weight.detach().numpy().T)
        np.testing.assert_allclose(error, np.sqrt(np.sum(s[k:] ** 2)), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", ["stride2-pad1-dil2", "groups", "non-square", "circular-groups-stride"])
def test_conv2d_truncation_error_is_the_svd_tail(case):
    conv, _ = _conv(case, dtype=torch.float64, seed=8)
    blocks = _group_blocks(conv)
    s = np.linalg.svd(blocks, compute_uv=False)  # (groups, full)
    for k in range(1, _full_rank(conv) + 1):
        dense = LowRankConv2d.from_dense(conv, k).to_dense()
        error = np.linalg.norm(blocks - _group_blocks(dense))
        np.testing.assert_allclose(error, np.sqrt(np.sum(s[:, k:] ** 2)), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.9, 1.0])
def test_param_ratio_keeps_at_most_that_fraction_of_the_parameters(ratio):
    dense = nn.Linear(64, 32, bias=False)
    low = LowRankLinear.from_dense(dense, ParamRatio(ratio))
    kept = sum(p.numel() for p in low.parameters())
    assert kept <= ratio * dense.weight.numel()  # never more than asked for
    assert kept + (64 + 32) > ratio * dense.weight.numel()  # and one more rank would be


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: LowRankLinear.from_dense(nn.Linear(4, 3), 0),
        lambda: LowRankLinear(4, 3, 0),
        lambda: LowRankConv2d.from_dense(nn.Conv2d(2, 4, 3), 0),
        lambda: LowRankConv2d(nn.Conv2d(2, 4, 3), 0),
        lambda: LowRankEmbedding.from_dense(nn.Embedding(5, 3), 0),
        lambda: LowRankEmbedding(5, 3, 0),
    ],
)
def test_rank_zero_is_rejected(build):
    with pytest.raises(ValueError, match="rank"):
        build()


@pytest.mark.parametrize(
    "build, expected",
    [
        (lambda: LowRankLinear.from_dense(nn.Conv2d(1, 2, 3), 1), "nn.Linear or Conv1D, got Conv2d"),
        (lambda: LowRankLinear.from_dense(nn.Embedding(4, 3), 1), "got Embedding"),
        (lambda: LowRankConv2d.from_dense(nn.Linear(2, 3), 1), "nn.Conv2d, got Linear"),
        (lambda: LowRankConv2d.from_dense(nn.Conv1d(2, 3, 3), 1), "got Conv1d"),
        (lambda: LowRankEmbedding.from_dense(nn.Linear(2, 3), 1), "nn.Embedding, got Linear"),
    ],
)
def test_wrong_module_type_is_rejected(build, expected):
    with pytest.raises(TypeError, match=re.escape(expected)):
        build()


def test_embedding_with_max_norm_is_rejected():
    with pytest.raises(ValueError, match="max_norm"):
        LowRankEmbedding.from_dense(nn.Embedding(5, 3, max_norm=1.0), 1)


@pytest.mark.parametrize(
    "build",
    [
        lambda: LowRankLinear.from_factors(nn.Linear(4, 3), torch.randn(3, 2), torch.randn(3, 4)),
        lambda: LowRankLinear.from_factors(nn.Linear(4, 3), torch.randn(3), torch.randn(1, 4)),
        lambda: LowRankLinear.from_factors(nn.Linear(4, 3), torch.randn(3, 2), torch.randn(2, 4, 1)),
        lambda: LowRankLinear.from_factors(nn.Linear(4, 5), torch.randn(3, 2), torch.randn(2, 4)),
        lambda: LowRankConv2d.from_factors(nn.Conv2d(4, 6, 3), torch.randn(1, 6, 2), torch.randn(1, 3, 36)),
        lambda: LowRankConv2d.from_factors(nn.Conv2d(4, 6, 3), torch.randn(1, 6, 2), torch.randn(1, 2, 35)),
        lambda: LowRankConv2d.from_factors(nn.Conv2d(4, 6, 3), torch.randn(1, 5, 2), torch.randn(1, 2, 36)),
        lambda: LowRankConv2d.from_factors(nn.Conv2d(4, 6, 3, groups=2), torch.randn(1, 6, 2), torch.randn(1, 2, 18)),
        lambda: LowRankEmbedding.from_factors(nn.Embedding(10, 5), torch.randn(10, 2), torch.randn(3, 5)),
    ],
)
def test_mismatched_factor_shapes_are_rejected(build):
    with pytest.raises(ValueError, match=r"shape|expected"):
        build()


def test_conv2d_from_factors_accepts_ungrouped_2d_factors():
    conv = nn.Conv2d(4, 6, 3)
    low = LowRankConv2d.from_factors(conv, torch.randn(6, 2), torch.randn(2, 36))
    assert low.rank == 2


# ---------------------------------------------------------------------------------------------
# LowRankEmbedding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_idx", [None, 0, 7, -1])
def test_embedding_round_trip_and_padding_idx(padding_idx):
    torch.manual_seed(9)
    embedding = nn.Embedding(20, 6, padding_idx=padding_idx)
    low = LowRankEmbedding.from_dense(embedding, 6)
    assert low.padding_idx == embedding.padding_idx  # nn.Embedding stores a negative index as positive
    ids = torch.tensor([[0, 7, 19], [3, 3, 12]])
    _assert_close(low(ids), embedding(ids))
    dense = low.to_dense()
    assert type(dense) is nn.Embedding and dense.padding_idx == embedding.padding_idx
    _assert_close(dense.weight, embedding.weight)
    if padding_idx is not None:
        # the padding row is zero in the dense table and stays (numerically) zero at full rank
        assert float(low(torch.tensor([embedding.padding_idx])).detach().abs().max()) < 1e-6
        # and it receives no gradient
        low(ids).sum().backward()
        assert torch.count_nonzero(low.u.grad[embedding.padding_idx]) == 0
        assert torch.count_nonzero(low.u.grad[3]) > 0


def test_embedding_truncation_error_is_the_svd_tail():
    torch.manual_seed(10)
    embedding = nn.Embedding(30, 8).double()
    E = embedding.weight.detach().numpy()
    s = np.linalg.svd(E, compute_uv=False)
    dense = LowRankEmbedding.from_dense(embedding, 3).to_dense()
    error = np.linalg.norm(E - dense.weight.detach().numpy())
    np.testing.assert_allclose(error, np.sqrt(np.sum(s[3:] ** 2)), rtol=1e-9)


# ---------------------------------------------------------------------------------------------
# The digits compression benchmark still runs
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compress_digits_benchmark_quick(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    try:
        module = importlib.import_module("compress_digits")
        out = tmp_path / "digits.json"
        module.main(["--quick", "--json", str(out)])
    finally:
        sys.modules.pop("compress_digits", None)
        sys.modules.pop("_common", None)
    payload = json.loads(out.read_text())
    methods = {row["method"] for row in payload["rows"]}
    assert {"svd", "asvd", "whiten", "fisher"} <= methods
    for row in payload["rows"]:
        assert 0 <= row["accuracy"] <= 1
        assert 0 < row["kept_fraction"] <= 0.55
