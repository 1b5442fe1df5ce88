"""Layer kinds: one registry record per kind, every list of kinds derived from it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from svdkit.layers.lora import lora_kinds
from svdkit.layers.lowrank import LowRankConv2d, LowRankEmbedding, LowRankLinear, low_rank_class
from svdkit.views import WeightView, get_view, kinds, patch_rows, register_view, set_weight_matrix, token_rows, unregister_view, view_of_kind, weight_matrix

transformers = pytest.importorskip("transformers")


def test_the_built_in_kinds_and_what_their_records_hold():
    assert kinds() == ("embedding", "conv2d", "conv1d", "linear")
    assert kinds(lambda v: v.calibrated) == ("conv2d", "conv1d", "linear")
    assert set(lora_kinds()) == {"conv2d", "conv1d", "linear"}
    assert {kind: view_of_kind(kind).low_rank for kind in kinds()} == {
        "embedding": LowRankEmbedding, "conv2d": LowRankConv2d, "conv1d": LowRankLinear, "linear": LowRankLinear}
    conv1d = transformers.pytorch_utils.Conv1D(6, 4)
    assert low_rank_class(conv1d) is LowRankLinear and get_view(conv1d).kind == "conv1d"
    with pytest.raises(KeyError, match="no layer kind named 'nope'; registered: embedding, conv2d, conv1d, linear"):
        view_of_kind("nope")


@pytest.mark.parametrize("make", [lambda: nn.Linear(5, 3), lambda: transformers.pytorch_utils.Conv1D(3, 5),
                                  lambda: nn.Conv2d(2, 3, 2, groups=1), lambda: nn.Embedding(7, 4)])
def test_a_weight_reads_as_a_matrix_and_writes_back(make):
    layer = make()
    W = weight_matrix(layer).detach().clone()
    set_weight_matrix(layer, 2 * W)
    torch.testing.assert_close(weight_matrix(layer), 2 * W)
    with pytest.raises(ValueError, match="expects a"):
        set_weight_matrix(layer, torch.zeros(W.shape[0] + 1, W.shape[1]))


def test_input_rows_are_what_the_matrix_multiplies():
    """y = W x row by row: a Linear's tokens (padding left out), a Conv2d's patches."""
    linear = nn.Linear(4, 3, bias=False)
    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    rows = token_rows(linear, x, mask)
    assert rows.shape == (8, 4)
    torch.testing.assert_close(rows @ linear.weight.T, linear(x)[mask.bool()])
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=False)
    image = torch.randn(1, 2, 6, 6)
    torch.testing.assert_close(patch_rows(conv, image) @ weight_matrix(conv).T, conv(image).permute(0, 2, 3, 1).reshape(-1, 3))


def test_a_kind_name_is_registered_once_and_removed_cleanly():
    before = kinds()
    view = WeightView("scaled_twice", lambda m: m.weight, lambda m, W: None)
    register_view(lambda m: False, view)
    try:
        with pytest.raises(ValueError, match="'scaled_twice' is already registered"):
            register_view(lambda m: False, WeightView("scaled_twice", lambda m: m.weight, lambda m, W: None))
    finally:
        unregister_view("scaled_twice")
    assert kinds() == before
