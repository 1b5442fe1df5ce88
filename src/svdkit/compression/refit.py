"""Closed-form refit of factorized layers on the inputs they actually receive.

After compression, each layer sees inputs ``x~`` that earlier compressed layers have already
perturbed, while the original layer saw ``x``. A refit pass runs the original and the compressed
model side by side on the calibration data, accumulates ``A~ = E[x~ x~^T]`` and
``C = E[x~ x^T]`` for every factorized layer, and re-solves the reduced-rank regression

    min over rank-k W'  of  E || W x - W' x~ ||^2     (optionally weighted by R^T on the left)

in closed form: with ``L~ L~^T = A~``, the minimizer is ``W' = trunc_k(W C^T L~^-T) L~^-1``
(the least-squares fit ``W C^T A~^-1`` truncated in the ``A~`` metric). When ``x~ = x`` this is
exactly the ``whiten`` method, so a refit can only lower the calibration output error of each
layer given its current inputs.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..batches import run_batch
from ..calibrate import GramStats, check_finite, layer_inputs
from ..linalg import cholesky_factor
from ..progress import ProgressLike, track
from ..surgery import replace_module
from ..views import get_view, weight_matrix
from .methods import Factorization, Transform, factorize
from .plan import LayerPlan

__all__ = ["refit"]

Forward = Callable[[nn.Module, Any], Any]


class _PairStats:
    """Streams ``sum x~ x~^T`` and ``sum x~ x^T`` for one layer: the Gram of the rows ``[x~, x]``
    (:class:`~svdkit.calibrate.GramStats`: chunked products, float64 sums), whose top blocks they are."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.stats: GramStats | None = None

    def update(self, compressed: torch.Tensor, original: torch.Tensor, batch: int) -> None:
        original = original.to(compressed.device)
        if compressed.shape != original.shape:
            raise RuntimeError(f"original and compressed layer {self.name} saw inputs of shapes {tuple(original.shape)} and {tuple(compressed.shape)}")
        rows = torch.cat([compressed, original], dim=1)
        increment = GramStats.zeros(rows.shape[1], device=rows.device)
        increment.update(rows)
        check_finite(increment, self.name, "input (refit)", batch)
        self.stats = increment if self.stats is None else self.stats.merge(increment)

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``E[x~ x~^T]`` and ``E[x~ x^T]``, each (d, d), float64."""
        d = self.stats.gram.shape[0] // 2
        gram = self.stats.gram / self.stats.count
        return gram[:d, :d], gram[:d, d:]


class _StageDone(Exception):
    """Raised from a hook once every layer of the stage has its input: the rest of the forward is not needed."""


def _call_order(compressed: nn.Module, plans: list[LayerPlan], batch: Any, forward: Forward | None) -> list[list[LayerPlan]]:
    """Plans in the order the compressed model calls them, grouped into stages of layers that
    read the same input tensor (such as query, key and value).

    The input tensors are kept alive until the order is read, so two stages never look alike
    because a freed tensor's id was reused.
    """
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [
        compressed.get_submodule(plan.name).register_forward_pre_hook(
            lambda module, inputs, name=plan.name: calls.append((name, inputs[0])))
        for plan in plans
    ]
    try:
        with torch.no_grad():
            run_batch(compressed, batch, forward)
    finally:
        for handle in handles:
            handle.remove()
    by_name = {plan.name: plan for plan in plans}
    stages: list[list[LayerPlan]] = []
    last_input = None
    placed: set[str] = set()
    for name, tensor in calls:
        if name in placed:
            continue
        placed.add(name)
        if stages and tensor is last_input:
            stages[-1].append(by_name[name])
        else:
            stages.append([by_name[name]])
        last_input = tensor
    return stages


def _collect_pairs(
    original: nn.Module,
    compressed: nn.Module,
    stage: list[LayerPlan],
    batches: Iterable[Any],
    forward: Forward | None,
) -> dict[str, _PairStats]:
    """Input statistics of one stage, with both forwards stopped as soon as the stage is reached."""
    seen: dict[str, torch.Tensor] = {}
    pairs = {plan.name: _PairStats(plan.name) for plan in stage}
    done: set[str] = set()
    names = {plan.name for plan in stage}
    handles = []
    current = [0]
    for plan in stage:
        def keep_original(module, inputs, name=plan.name):
            seen[name] = layer_inputs(module, inputs[0])
            if names <= seen.keys():
                raise _StageDone

        def pair(module, inputs, name=plan.name, dense=plan.module):
            pairs[name].update(layer_inputs(dense, inputs[0]), seen[name], current[0])
            done.add(name)
            if names <= done:
                raise _StageDone

        handles.append(plan.module.register_forward_pre_hook(keep_original))
        handles.append(compressed.get_submodule(plan.name).register_forward_pre_hook(pair))
    try:
        with torch.no_grad():
            for index, batch in enumerate(batches):
                current[0] = index
                for model in (original, compressed):
                    try:
                        run_batch(model, batch, forward)
                    except _StageDone:
                        pass
                seen.clear()
                done.clear()
    finally:
        for handle in handles:
            handle.remove()
    return pairs


def _refit_factorization(W: torch.Tensor, pair_gram: torch.Tensor, pair_cross: torch.Tensor, base: Factorization, damping: float) -> Factorization:
    L, _ = cholesky_factor(pair_gram, damping=damping)
    # M = W C^T L^-T = (L^-1 C W^T)^T, C = E[x~ x^T]
    M = torch.linalg.solve_triangular(L, pair_cross @ W.to(torch.float64).T, upper=False).T
    undo_left = base.transform.undo_left
    if undo_left is not None:
        # The base factorization weighted the output side by R^T (fisher): apply the same weight.
        eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
        R_t = torch.linalg.inv(undo_left(eye))
        M = R_t @ M
    return factorize(Transform(
        M, undo_left=undo_left, undo_right=lambda Y: torch.linalg.solve_triangular(L, Y, upper=False, left=False),
        method=base.method + "+refit", note=base.note,
    ))


def refit(
    original: nn.Module,
    compressed: nn.Module,
    plans: list[LayerPlan],
    ranks: list[int | None],
    batches: list[Any],
    forward: Forward | None = None,
    *,
    damping: float = 1e-6,
    progress: ProgressLike = None,
) -> list[LayerPlan]:
    """Refit the factorized layers of ``compressed`` one stage at a time, in call order (in place).

    Each stage (the layers that read one input tensor) is refitted on the inputs that the
    already-refitted earlier stages produce, so corrections do not compound.

    Parameters
    ----------
    original, compressed : nn.Module
        The dense model and its compressed copy (same module names).
    plans : list of LayerPlan
        The plans that built the compressed layers (their ``module`` is the original layer).
    ranks : list of int or None
        The rank of each plan; None (dense) plans are left alone.
    batches : list
        Calibration batches.
    forward : callable, optional
        ``forward(module, batch)`` runs ``module`` on a batch (default :func:`svdkit.batches.run_batch`).
    damping : float
        Relative damping of ``A~``.
    progress : bool or callable, optional
        Progress over the stages (see :mod:`svdkit.progress`).

    Returns
    -------
    list of LayerPlan
        Updated plans (the refitted factorizations), in the same order.

    Notes
    -----
    Each stage costs one pass over the calibration data through both models, stopped as soon as
    the stage's layers have their inputs.
    """
    rank_of = {plan.name: k for plan, k in zip(plans, ranks)}
    active = [plan for plan in plans if rank_of[plan.name] is not None and get_view(plan.module).calibrated
              and not isinstance(compressed.get_submodule(plan.name), type(plan.module))]
    if not active or not batches:
        return plans
    modes = original.training, compressed.training
    original.eval()
    compressed.eval()
    updated: dict[str, LayerPlan] = {}
    try:
        stages = _call_order(compressed, active, batches[0], forward)
        for stage in track(stages, progress, desc="refit stages"):
            pairs = _collect_pairs(original, compressed, stage, batches, forward)
            for plan in stage:
                new_plan = _refit_plan(plan, pairs[plan.name], damping)
                replace_module(compressed, plan.name, new_plan.build(rank_of[plan.name]))
                updated[plan.name] = new_plan
    finally:
        original.train(modes[0])
        compressed.train(modes[1])
    return [updated.get(plan.name, plan) for plan in plans]


def _refit_plan(plan: LayerPlan, stats: _PairStats, damping: float) -> LayerPlan:
    blocks = weight_matrix(plan.module).detach().reshape(plan.groups, plan.shape[0], plan.shape[1])
    size = plan.shape[1]
    gram, cross = stats.means()
    factorizations = []
    for g in range(plan.groups):
        part = slice(g * size, (g + 1) * size)
        factorizations.append(_refit_factorization(blocks[g], gram[part, part], cross[part, part], plan.factorizations[g], damping))
    return LayerPlan(plan.name, plan.module, plan.kind, factorizations, plan.shape, plan.tokens)
