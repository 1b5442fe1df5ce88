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

from ..calibrate import layer_inputs
from ..linalg import svd
from ..surgery import replace_module
from ..views import weight_matrix
from .methods import Factorization, cholesky_factor
from .plan import LayerPlan

__all__ = ["refit"]


class _PairStats:
    """Streams ``sum x~ x~^T`` and ``sum x~ x^T`` for one layer."""

    def __init__(self, dim: int, device: torch.device) -> None:
        self.gram = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.cross = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.count = 0

    def update(self, compressed: torch.Tensor, original: torch.Tensor) -> None:
        Xc, Xo = compressed.to(torch.float64), original.to(self.gram.device, torch.float64)
        if Xc.shape != Xo.shape:
            raise RuntimeError(f"original and compressed layers saw inputs of shapes {tuple(Xo.shape)} and {tuple(Xc.shape)}")
        self.gram.addmm_(Xc.T, Xc)
        self.cross.addmm_(Xc.T, Xo)
        self.count += Xc.shape[0]


def _collect_pairs(
    original: nn.Module,
    compressed: nn.Module,
    plans: list[LayerPlan],
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any],
) -> dict[str, _PairStats]:
    seen: dict[str, torch.Tensor] = {}
    pairs: dict[str, _PairStats] = {}
    handles = []
    for plan in plans:
        def keep_original(module, inputs, name=plan.name):
            seen[name] = layer_inputs(module, inputs[0])

        def pair(module, inputs, name=plan.name, dense=plan.module):
            rows = layer_inputs(dense, inputs[0])
            if name not in pairs:
                pairs[name] = _PairStats(rows.shape[1], rows.device)
            pairs[name].update(rows, seen.pop(name))

        handles.append(plan.module.register_forward_pre_hook(keep_original))
        handles.append(compressed.get_submodule(plan.name).register_forward_pre_hook(pair))
    modes = original.training, compressed.training
    original.eval()
    compressed.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                forward(original, batch)
                forward(compressed, batch)
                seen.clear()
    finally:
        for handle in handles:
            handle.remove()
        original.train(modes[0])
        compressed.train(modes[1])
    return pairs


def _refit_factorization(W: torch.Tensor, pair_gram: torch.Tensor, pair_cross: torch.Tensor, base: Factorization, damping: float) -> Factorization:
    L, _ = cholesky_factor(pair_gram, damping=damping)
    # M = W C^T L^-T = (L^-1 C W^T)^T, C = E[x~ x^T]
    M = torch.linalg.solve_triangular(L, pair_cross @ W.to(torch.float64).T, upper=False).T
    undo_left = base.undo_left
    if undo_left is not None:
        # The base factorization weighted the output side by R^T (fisher): apply the same weight.
        eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
        R_t = torch.linalg.inv(undo_left(eye))
        M = R_t @ M
    U, S, Vh = svd(M)
    out = Factorization(U, S, Vh, undo_left=undo_left, method=base.method + "+refit", note=base.note)
    out.undo_right = lambda Y: torch.linalg.solve_triangular(L, Y, upper=False, left=False)
    return out


def refit(
    original: nn.Module,
    compressed: nn.Module,
    plans: list[LayerPlan],
    ranks: list[int | None],
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any],
    *,
    damping: float = 1e-6,
) -> list[LayerPlan]:
    """One refit pass over the factorized layers of ``compressed`` (modified in place).

    Parameters
    ----------
    original, compressed : nn.Module
        The dense model and its compressed copy (same module names).
    plans : list of LayerPlan
        The plans that built the compressed layers (their ``module`` is the original layer).
    ranks : list of int or None
        The rank of each plan; None (dense) plans are left alone.
    batches : iterable
        Calibration batches; re-iterable.
    forward : callable
        ``forward(module, batch)`` runs ``module`` on a batch.
    damping : float
        Relative damping of ``A~``.

    Returns
    -------
    list of LayerPlan
        Updated plans (the refitted factorizations), in the same order.
    """
    active = [(plan, k) for plan, k in zip(plans, ranks) if k is not None and plan.kind in ("linear", "conv1d", "conv2d")
              and not isinstance(compressed.get_submodule(plan.name), type(plan.module))]
    pairs = _collect_pairs(original, compressed, [p for p, _ in active], batches, forward)
    updated = {}
    for plan, k in active:
        stats = pairs[plan.name]
        groups = plan.groups
        blocks = weight_matrix(plan.module).detach().reshape(groups, plan.shape[0], plan.shape[1])
        size = plan.shape[1]
        factorizations = []
        for g in range(groups):
            part = slice(g * size, (g + 1) * size)
            factorizations.append(_refit_factorization(
                blocks[g], stats.gram[part, part] / stats.count, stats.cross[part, part] / stats.count,
                plan.factorizations[g], damping,
            ))
        new_plan = LayerPlan(plan.name, plan.module, plan.kind, factorizations, plan.shape)
        replace_module(compressed, plan.name, new_plan.build(k))
        updated[plan.name] = new_plan
    return [updated.get(plan.name, plan) for plan in plans]
