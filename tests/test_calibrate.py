"""Calibration statistics: Gram accumulation, input rows of each layer kind."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
from torch import nn


@pytest.mark.parametrize("width", [48, 601, 1155])  # one block, two (halves), three
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_gram_accumulation_matches_a_float64_reference(dtype, width):
    """Narrow input is multiplied in float32 chunks (wide input by column blocks) and summed in
    float64: the Gram stays within float32 rounding of the exact one, however many rows arrive
    (heavy-tailed, as activations are)."""
    from svdkit.calibrate import GRAM_CHUNK, GramStats, symmetric_blocks

    assert len(symmetric_blocks(width)) - 1 == {48: 1, 601: 2, 1155: 3}[width]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    rows = [torch.distributions.StudentT(3.0).sample((n, width)) * torch.rand(width, generator=g) * 10 for n in (7, GRAM_CHUNK + 5, 3000)]
    stats = GramStats.zeros(width)
    for X in rows:
        stats.update(X.to(dtype))
    exact = np.concatenate([X.to(dtype).double().numpy() for X in rows])
    reference = exact.T @ exact
    scale = np.abs(exact).T @ np.abs(exact)
    assert stats.count == len(exact)
    assert np.max(np.abs(stats.gram.numpy() - reference) / scale) < (1e-12 if dtype == torch.float64 else 1e-6)
    if dtype != torch.float64:  # blocks below the diagonal are mirrored, not computed again
        np.testing.assert_array_equal(stats.gram.numpy(), stats.gram.numpy().T)
    np.testing.assert_allclose(stats.abs_sum.numpy(), np.abs(exact).sum(0), rtol=1e-6)


@settings(max_examples=60, deadline=None)
@given(width=st.integers(1, 5000))
def test_symmetric_blocks_cover_the_columns_with_blocks_no_narrower_than_the_block_width(width):
    from svdkit.calibrate import SYMMETRIC_BLOCK_WIDTH, SYMMETRIC_SPLIT_WIDTH, symmetric_blocks

    edges = symmetric_blocks(width)
    sizes = np.diff(edges)
    assert edges[0] == 0 and edges[-1] == width and (sizes > 0).all()
    if width < SYMMETRIC_SPLIT_WIDTH:
        assert len(sizes) == 1
    elif len(sizes) > 2:
        assert sizes.min() >= SYMMETRIC_BLOCK_WIDTH and sizes.max() - sizes.min() <= 1


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


def test_rows_weighted_by_routing_weights_give_the_weighted_gram():
    from svdkit.batches import row_weights
    from svdkit.calibrate import InputRecorder

    layer = nn.Linear(3, 2)
    x = torch.randn(6, 3, dtype=torch.float64)
    w = torch.rand(6, dtype=torch.float64)
    layer.double()
    with InputRecorder([("l", layer)], weighted=True) as weighted, InputRecorder([("l", layer)]) as plain:
        weighted.next_batch(0)
        plain.next_batch(0)
        with row_weights(w):
            layer(x)
    torch.testing.assert_close(weighted.stats["l"].gram, (x * w[:, None]).T @ (x * w[:, None]))
    torch.testing.assert_close(plain.stats["l"].gram, x.T @ x)


def test_the_output_tensor_of_a_forward_result():
    from svdkit.batches import output_tensor

    t = torch.ones(2)
    assert output_tensor(t) is t
    assert output_tensor({"input_ids": torch.ones(2, dtype=torch.long), "logits": t}) is t
    assert output_tensor((t, None)) is t
    with pytest.raises(TypeError, match="cannot find an output tensor in a str"):
        output_tensor("no")
