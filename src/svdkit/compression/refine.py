"""Block refinement: after a block is factorized, train its factors so the block reproduces the
dense block's outputs, stopped early on windows it is not trained on.

The block pipeline factorizes each layer of a block on its own (each layer's truncation is optimal
in its metric, but the errors of a block's layers add up and interact). Refinement lowers the error
of the block as a whole: the compressed block ``f~`` is fed the inputs the compressed model gives
it, ``x~``, and its factors (and their biases; nothing else) are trained with Adam on the relative
squared error ``||f~(x~) - y||^2 / ||y||^2`` against a target ``y``:

==============  ==============================================================================
``"dense"``     ``y = f(x)``: the dense block on the dense model's inputs (AA-SVD's anchored
                objective, arXiv:2604.02119): the block also corrects what the blocks before it
                lost, at the cost of running the dense model beside the compressed one
``"shifted"``   ``y = f(x~)``: the dense block on the same inputs (no extra forward: the
                statistics' pass computes it); the block only repairs its own error
==============  ==============================================================================

The calibration batches are split: the last ``held_out`` fraction of them (at least one) are never
trained on. After every epoch the error on them is measured; refinement stops when it rises (or
stops improving by ``1e-4`` relatively), and the factors of the best epoch are kept. The block's
record (:class:`BlockRefinement`) holds the held-out and training errors before and after, the
epochs run and why it stopped; a block whose held-out error no epoch lowered is left as it was.

Under torchrun each process holds its share of the batches; the split, the order of the steps and
the factors kept are those of one process (each step's gradient comes from the rank that holds its
batch and is summed over the ranks), so the result does not depend on the number of processes,
though only one of them works at each step. A resumable run keeps the dense model's inputs to the
next block beside the compressed model's, so that a resumed run refines toward the same target.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..distributed import Group
from ..layers.lowrank import low_rank_types

__all__ = ["BlockRefinement", "REFINE_TARGETS", "held_out_split", "refine_block"]

REFINE_TARGETS = ("dense", "shifted")
_MIN_GAIN = 1e-4


@dataclass
class BlockRefinement:
    """What refinement did to one block.

    Attributes
    ----------
    block : int
    epochs : int
        Epochs trained (the kept factors are those after epoch ``best_epoch``; 0: the block's own).
    best_epoch : int
    stopped : str
        ``"held-out error rose"``, ``"no held-out gain"`` or ``"max epochs"``.
    train_before, train_after, held_out_before, held_out_after : float
        Relative squared error of the block's output on the training and the held-out batches,
        before refinement and with the kept factors.
    held_out_curve : list of float
        The held-out error after each epoch.
    """

    block: int
    epochs: int = 0
    best_epoch: int = 0
    stopped: str = ""
    train_before: float = float("nan")
    train_after: float = float("nan")
    held_out_before: float = float("nan")
    held_out_after: float = float("nan")
    held_out_curve: list[float] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def held_out_split(count: int, fraction: float) -> tuple[list[int], list[int]]:
    """Indices of the training and the held-out batches: the last ``ceil(fraction * count)``
    batches (at least one, and at least one left to train on) are held out."""
    if count < 2:
        raise ValueError(f"block refinement needs at least 2 calibration batches (one held out), got {count}")
    held = min(count - 1, max(1, math.ceil(fraction * count - 1e-9)))
    return list(range(count - held)), list(range(count - held, count))


def _factors(block: nn.Module) -> list[nn.Parameter]:
    seen: set[int] = set()
    params = []
    for module in block.modules():
        if isinstance(module, low_rank_types()):
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
    return params


def _squares(out: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """``||out - y||^2`` and ``||y||^2``."""
    return float((out.to(y.device, y.dtype) - y).square().sum()), float(y.square().sum())


def _error(run: Callable[[int], torch.Tensor], targets: Sequence[torch.Tensor], rows: Sequence[int], group: Group) -> float:
    """Relative squared error over ``rows`` (this rank's) and every other rank's: sum ||out - y||^2 / sum ||y||^2."""
    num = den = 0.0
    with torch.no_grad():
        for i in rows:
            a, b = _squares(run(i), targets[i])
            num, den = num + a, den + b
    num, den = group.sum_floats([num, den])
    return num / max(den, 1e-30)


def _split_errors(run: Callable[[int], torch.Tensor], targets: Sequence[torch.Tensor], places: Sequence[int], held: set[int],
                  group: Group, keep_output: Callable[[int, torch.Tensor], None] | None = None) -> tuple[float, float]:
    """The training and held-out errors (as :func:`_error`) in one pass over this rank's batches
    (``places``: their places in the whole list; ``held``: the held-out places); ``keep_output``
    receives each output as soon as it is made."""
    sums = {False: [0.0, 0.0], True: [0.0, 0.0]}
    with torch.no_grad():
        for i, place in enumerate(places):
            out = run(i)
            a, b = _squares(out, targets[i])
            part = sums[place in held]
            part[0], part[1] = part[0] + a, part[1] + b
            if keep_output is not None:
                keep_output(i, out)
    train_num, train_den, held_num, held_den = group.sum_floats(sums[False] + sums[True])
    return train_num / max(train_den, 1e-30), held_num / max(held_den, 1e-30)


def refine_block(
    block: nn.Module,
    index: int,
    run: Callable[[int], torch.Tensor],
    targets: Sequence[torch.Tensor],
    *,
    epochs: int,
    lr: float,
    held_out: float,
    seed: int = 0,
    batches: Sequence[int] | None = None,
    group: Group = Group(),
    keep_output: Callable[[int, torch.Tensor], None] | None = None,
) -> BlockRefinement:
    """Train the factors of ``block`` (in place) toward ``targets``, with early stopping.

    With several processes each holds its share of the batches: the split and the order of the
    steps are those of the whole list, each step's gradient is computed by the rank that holds its
    batch and summed over the ranks, and the errors are summed, so every rank takes the steps one
    process takes and keeps the same factors.

    Parameters
    ----------
    block : nn.Module
        A block whose target layers were factorized.
    index : int
        Its index (for the record).
    run : callable
        ``run(i)`` runs the block on this rank's calibration batch ``i``'s (compressed-model) input
        and returns its output, shape (batch, seq, d), with autograd on when it is enabled.
    targets : sequence of Tensor
        The output to reproduce for each of this rank's batches, each of ``run(i)``'s shape.
    epochs : int
        Most epochs over the training batches.
    lr : float
        Adam's learning rate.
    held_out : float
        Fraction of the batches held out (see :func:`held_out_split`).
    seed : int
        Order of the training batches in each epoch.
    batches : sequence of int, optional
        The place of each of this rank's batches in the whole calibration list (default: 0, 1, ...).
    group : Group
        The processes that refine together (:mod:`svdkit.distributed`).
    keep_output : callable, optional
        ``keep_output(i, y)`` receives the block's output on each of this rank's batches with the
        kept factors (the next block's input), from the pass that measures the errors after refinement.

    Returns
    -------
    BlockRefinement
    """
    record = BlockRefinement(index)
    params = _factors(block)
    if not params or epochs < 1:
        record.stopped = "nothing to refine"
        if keep_output is not None:
            with torch.no_grad():
                for i in range(len(targets)):
                    keep_output(i, run(i))
        return record
    places = list(range(len(targets))) if batches is None else list(batches)
    local = {place: i for i, place in enumerate(places)}
    with group.checked():
        train, held = held_out_split(group.sum_ints([len(targets)])[0], held_out)
    held_set = set(held)
    my_held = [local[g] for g in held if g in local]
    flags = [(p, p.requires_grad) for p in params]
    record.train_before, record.held_out_before = _split_errors(run, targets, places, held_set, group)
    best = record.held_out_before
    kept = [p.detach().clone() for p in params]
    generator = torch.Generator().manual_seed(seed * 7919 + index)
    try:
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=lr)
        record.stopped = "max epochs"
        for epoch in range(1, epochs + 1):
            for step in torch.randperm(len(train), generator=generator).tolist():
                optimizer.zero_grad(set_to_none=True)
                i = local.get(train[step])
                if i is not None:  # this rank holds the step's batch
                    y = targets[i]
                    with torch.enable_grad():
                        out = run(i)
                        loss = (out - y.to(out.device, out.dtype)).square().sum() / y.square().sum().clamp_min(1e-30)
                    loss.backward()
                group.sum_gradients(params)
                optimizer.step()
            record.epochs = epoch
            error = _error(run, targets, my_held, group)
            record.held_out_curve.append(error)
            if error < best * (1 - _MIN_GAIN):
                best, record.best_epoch = error, epoch
                kept = [p.detach().clone() for p in params]
            elif error > best:
                record.stopped = "held-out error rose"
                break
            else:
                record.stopped = "no held-out gain"
                break
    finally:
        with torch.no_grad():
            for p, value in zip(params, kept):
                p.copy_(value)
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None
    # one pass with the kept factors: their errors, and each output handed on
    record.train_after, record.held_out_after = _split_errors(run, targets, places, held_set, group, keep_output)
    return record
