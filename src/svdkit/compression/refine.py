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
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

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


def _error(run: Callable[[int], torch.Tensor], targets: Sequence[torch.Tensor], rows: Sequence[int]) -> float:
    """Relative squared error summed over ``rows``: sum ||out - y||^2 / sum ||y||^2."""
    num = den = 0.0
    with torch.no_grad():
        for i in rows:
            y = targets[i]
            out = run(i).to(y.dtype)
            num += float((out - y).square().sum())
            den += float(y.square().sum())
    return num / max(den, 1e-30)


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
) -> BlockRefinement:
    """Train the factors of ``block`` (in place) toward ``targets``, with early stopping.

    Parameters
    ----------
    block : nn.Module
        A block whose target layers were factorized.
    index : int
        Its index (for the record).
    run : callable
        ``run(i)`` runs the block on calibration batch ``i``'s (compressed-model) input and
        returns its output, shape (batch, seq, d), with autograd on when it is enabled.
    targets : sequence of Tensor
        The output to reproduce for every batch.
    epochs : int
        Most epochs over the training batches.
    lr : float
        Adam's learning rate.
    held_out : float
        Fraction of the batches held out (see :func:`held_out_split`).
    seed : int
        Order of the training batches in each epoch.

    Returns
    -------
    BlockRefinement
    """
    record = BlockRefinement(index)
    params = _factors(block)
    if not params or epochs < 1:
        record.stopped = "nothing to refine"
        return record
    train, held = held_out_split(len(targets), held_out)
    flags = [(p, p.requires_grad) for p in params]
    record.held_out_before = best = _error(run, targets, held)
    record.train_before = _error(run, targets, train)
    kept = [p.detach().clone() for p in params]
    generator = torch.Generator().manual_seed(seed * 7919 + index)
    try:
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=lr)
        record.stopped = "max epochs"
        for epoch in range(1, epochs + 1):
            for i in torch.randperm(len(train), generator=generator).tolist():
                y = targets[train[i]]
                with torch.enable_grad():
                    out = run(train[i])
                    loss = (out - y.to(out.device, out.dtype)).square().sum() / y.square().sum().clamp_min(1e-30)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            record.epochs = epoch
            error = _error(run, targets, held)
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
    record.held_out_after = best
    record.train_after = _error(run, targets, train) if record.best_epoch else record.train_before
    return record
