"""Block refinement (svdkit.compression.refine): early stopping on held-out batches, the block
pipeline's use of it, and refinement off leaving the block pipeline's results as they were."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from svdkit import CompressConfig, compress
from svdkit.compression import block_driver
from svdkit.compression.refine import held_out_split, refine_block
from svdkit.layers.lowrank import LowRankLinear

pytestmark = pytest.mark.usefixtures("one_thread")


def _low_rank_block(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    dense = nn.Linear(8, 8)
    block = nn.Sequential(LowRankLinear.from_factors(dense, torch.randn(8, 3) * 0.3, torch.randn(3, 8) * 0.3))
    return block


def _data(n: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 8, generator=generator) for _ in range(n)]


def test_held_out_split_keeps_at_least_one_batch_on_each_side():
    assert held_out_split(8, 0.125) == (list(range(7)), [7])
    assert held_out_split(2, 0.9) == ([0], [1])
    assert held_out_split(10, 0.25) == (list(range(7)), [7, 8, 9])
    with pytest.raises(ValueError, match="at least 2 calibration batches"):
        held_out_split(1, 0.5)


def test_refinement_stops_when_the_held_out_error_rises_and_keeps_the_best_factors():
    block = _low_rank_block()
    inputs = _data(8, 1)
    before = [p.detach().clone() for p in block.parameters()]
    # the held-out batch's target is the block's own output (its error is 0 and can only rise); the
    # training batches ask for something else, so every epoch moves the factors away from it
    targets = [block(x).detach() * 3.0 for x in inputs[:7]] + [block(inputs[7]).detach()]
    record = refine_block(block, 0, lambda i: block(inputs[i]), targets, epochs=10, lr=1e-2, held_out=0.125)
    assert record.stopped == "held-out error rose" and record.epochs == 1 and record.best_epoch == 0
    assert record.held_out_before == 0.0 and record.held_out_curve[0] > 0.0
    assert record.train_after == record.train_before
    for p, q in zip(block.parameters(), before):  # restored bit for bit
        assert torch.equal(p, q)
    assert all(p.grad is None for p in block.parameters())


def test_refinement_lowers_the_held_out_error_when_the_target_generalizes():
    block = _low_rank_block()
    teacher = nn.Linear(8, 8)
    inputs = _data(16, 2)
    targets = [teacher(x).detach() for x in inputs]
    kept: dict[int, torch.Tensor] = {}
    record = refine_block(block, 3, lambda i: block(inputs[i]), targets, epochs=30, lr=1e-2, held_out=0.25,
                          keep_output=kept.__setitem__)
    assert record.block == 3 and record.best_epoch >= 2
    # every batch's output with the kept factors is handed on (the next block's inputs)
    assert sorted(kept) == list(range(16))
    with torch.no_grad():
        for i, x in enumerate(inputs):
            assert torch.equal(kept[i], block(x))
    assert record.held_out_after < 0.9 * record.held_out_before and record.train_after < record.train_before
    assert record.held_out_after == pytest.approx(min(record.held_out_curve))
    # the record's held-out error is the error of the kept factors, measured independently
    held = [12, 13, 14, 15]
    with torch.no_grad():
        num = sum(float((block(inputs[i]) - targets[i]).square().sum()) for i in held)
        den = sum(float(targets[i].square().sum()) for i in held)
    assert record.held_out_after == pytest.approx(num / den, rel=1e-5)


def _batches(n: int = 8) -> list[torch.Tensor]:
    return [torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(n)]


@pytest.mark.parametrize("target", ["dense", "shifted"])
def test_the_block_pipeline_refines_every_block_and_reports_it(make_decoder, target):
    model = make_decoder("llama", causal=True, tied=True, layers=2, vocab=100)
    plain, _ = compress(model, CompressConfig(budget=0.5), _batches())
    refined, report = compress(model, CompressConfig(budget=0.5, refine_epochs=3, refine_lr=1e-4, refine_target=target), _batches())
    assert [r["block"] for r in report.refinement] == [0, 1]
    for r in report.refinement:
        assert r["held_out_after"] <= r["held_out_before"] and 1 <= r["epochs"] <= 3
    totals = report.totals()["refinement"]
    assert totals["blocks"] == 2 and "refinement" in report.to_dict()
    assert totals["held_out_before"] == pytest.approx(sum(r["held_out_before"] for r in report.refinement) / 2)
    # the printed report says what refinement did, not only the JSON
    assert (f"block refinement: {totals['blocks_changed']} of 2 blocks changed in {totals['epochs']} epochs; mean held-out error of "
            f"the blocks' outputs {totals['held_out_before']:.4g} -> {totals['held_out_after']:.4g}") in str(report)
    # only the factors moved; the ranks are the same as without refinement
    for (name, a), (_, b) in zip(plain.named_parameters(), refined.named_parameters()):
        assert a.shape == b.shape
        if not name.endswith((".u", ".v")):
            assert torch.equal(a, b), name


def test_refinement_off_leaves_the_block_pipeline_as_it_was(make_decoder, monkeypatch):
    model = make_decoder("llama", causal=True, tied=True, layers=2, vocab=100)

    def never(*args, **kwargs):
        raise AssertionError("refinement ran although it is off")

    config = CompressConfig(budget=0.5)
    with monkeypatch.context() as patched:
        patched.setattr(block_driver, "refine_block", never)
        off, report = compress(model, config, _batches())
    assert report.refinement == [] and "refinement" not in report.totals()
    # a refinement that no epoch improves restores the factors bit for bit: the same model as off
    unhelpful, record = compress(model, CompressConfig(budget=0.5, refine_epochs=2, refine_lr=1e-12), _batches())
    assert all(r["best_epoch"] == 0 for r in record.refinement)
    for (name, a), (_, b) in zip(off.state_dict().items(), unhelpful.state_dict().items()):
        assert torch.equal(a, b), name


def test_refinement_options_are_checked():
    with pytest.raises(ValueError, match="refine_target"):
        CompressConfig(refine_target="teacher")
    with pytest.raises(ValueError, match="refine_held_out"):
        CompressConfig(refine_held_out=1.0)
    with pytest.raises(ValueError, match="block pipeline"):
        CompressConfig(refine_epochs=2, pipeline="model")


def test_refinement_where_the_whole_model_pipeline_runs_is_refused(make_decoder):
    """``pipeline="auto"`` takes the whole-model pipeline with refit: refinement would be skipped."""
    model = make_decoder("llama", causal=True, tied=True, layers=2, vocab=100)
    assert CompressConfig(method="svd", refine_epochs=2).needs_data  # refinement needs calibration text
    with pytest.raises(ValueError, match=r"refine_epochs=2: block refinement runs in the block pipeline.*refine_epochs=0"):
        compress(model, CompressConfig(budget=0.5, refine_epochs=2, refit=1), _batches())
