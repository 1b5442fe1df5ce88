"""A basis shared by a layer's experts: one factor for all of them, a small one per expert.

Experts trained from one initialization share much of their row or column space (MoE-SVD,
D²-MoE, Sub-MoE). For the experts ``W_e`` (m, n) of one projection of one layer, each in its own
metric ``||P_e (W_e - W'_e) Q_e||_F`` (the method's transform: ``Q_e`` whitens the expert's inputs,
``P_e`` its output gradients under ``fisher``):

- **right basis** ``W_e ~= A_e B``: ``B`` (k, n) is the top-``k`` right singular subspace of the
  experts stacked in a common input metric (``vstack(P_e W_e Q)``, ``Q Q^T`` the pooled input
  Gram), and each ``A_e`` the exact least-squares fit in its own metric,
  ``A_e = W_e G_e B^T (B G_e B^T)^-1`` with ``G_e = Q_e Q_e^T``; ``k (n + E m)`` parameters;
- **left basis** ``W_e ~= A B_e``: the same on the other side (``hstack(P W_e Q_e)``, ``P^T P`` the
  pooled output-gradient Gram, or the identity without gradients); ``k (m + E n)`` parameters.

:func:`best_sharing` compares both with the experts factorized one by one at the ranks the budget
gave them, at equal parameters, by the error each leaves in the experts' own metrics (the rule
that drives the budget: what each parameter removes), and keeps the best of the three.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..linalg import cholesky_factor
from .plan import LayerPlan

__all__ = ["SharedBasis", "best_sharing"]


@dataclass
class SharedBasis:
    """One side of a group's experts shared.

    Attributes
    ----------
    side : {"right", "left"}
        Which factor the experts share.
    rank : int
    factors : dict of name -> (left (m, k), right (k, n))
        Each expert's factors; the shared one is the same tensor for all.
    error : float
        Squared error left, summed over the experts' metrics (each weighed by its share of tokens).
    params : int
    separate_error : float
        What the experts factorized one by one would leave with the same parameters.
    """

    side: str
    rank: int
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    error: float
    params: int
    separate_error: float


def _metric(plan: LayerPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, Q) of the plan's transform ``M = P W Q``, float64 (the identity where the method has none)."""
    transform = plan.factorizations[0].transform
    m, n = plan.shape
    eye_m, eye_n = torch.eye(m, dtype=torch.float64), torch.eye(n, dtype=torch.float64)
    P = torch.linalg.inv(transform.undo_left(eye_m)) if transform.undo_left is not None else eye_m
    Q = torch.linalg.inv(transform.undo_right(eye_n)) if transform.undo_right is not None else eye_n
    return P, Q


def _error(P: torch.Tensor, W: torch.Tensor, approximation: torch.Tensor, Q: torch.Tensor) -> float:
    return float((P @ (W - approximation) @ Q).square().sum())


def best_sharing(plans: list[LayerPlan], ranks: list[int | None]) -> SharedBasis | None:
    """A shared basis for the experts ``plans`` (one projection of one layer) when it leaves less
    error than their separate factors at ``ranks`` with the same parameters; None otherwise.

    Parameters
    ----------
    plans : list of LayerPlan
        The experts' factorizations (one group each, same shape); their transforms give each
        expert's metric, and the token-weighted mean of those metrics the common one.
    ranks : list of int or None
        The ranks the budget gave them (None: dense).
    """
    if len(plans) < 2 or any(k is None for k in ranks) or any(p.groups != 1 for p in plans):
        return None
    m, n = plans[0].shape
    experts = len(plans)
    budget = sum(k * (m + n) for k in ranks)
    # each expert's error counts as much as its share of the tokens (importance**2)
    shares = [p.factorizations[0].importance ** 2 for p in plans]
    separate = sum(w * float(p.factorizations[0].S[k:].square().sum()) for w, p, k in zip(shares, plans, ranks))
    weights = [p.module.weight.detach().to(torch.float64) for p in plans]
    metrics = [_metric(p) for p in plans]
    tokens = torch.tensor([float(p.tokens or 0) + 1.0 for p in plans], dtype=torch.float64)
    tokens = tokens / tokens.sum()
    Q_pool, _ = cholesky_factor(sum(t * Q @ Q.T for t, (_, Q) in zip(tokens, metrics)), damping=1e-9)
    P_pool = cholesky_factor(sum(t * P.T @ P for t, (P, _) in zip(tokens, metrics)), damping=1e-9)[0].T
    best = None
    for side, cost in (("right", n + experts * m), ("left", m + experts * n)):
        k = min(budget // cost, min(m, n))
        if k < 1:
            continue
        if side == "right":
            stacked = torch.cat([w ** 0.5 * P @ W @ Q_pool for w, W, (P, _) in zip(shares, weights, metrics)])
            B = torch.linalg.solve_triangular(Q_pool, torch.linalg.svd(stacked, full_matrices=False)[2][:k], upper=False, left=False)
            pairs = []
            for W, (P, Q) in zip(weights, metrics):
                G = Q @ Q.T
                A = torch.linalg.solve(B @ G @ B.T, B @ G @ W.T).T
                pairs.append((A, B))
        else:
            stacked = torch.cat([w ** 0.5 * P_pool @ W @ Q for w, W, (_, Q) in zip(shares, weights, metrics)], dim=1)
            A = torch.linalg.solve(P_pool, torch.linalg.svd(stacked, full_matrices=False)[0][:, :k])
            pairs = []
            for W, (P, Q) in zip(weights, metrics):
                H = P.T @ P
                pairs.append((A, torch.linalg.solve(A.T @ H @ A, A.T @ H @ W)))
        error = sum(w * _error(P, W, left @ right, Q) for w, W, (P, Q), (left, right) in zip(shares, weights, metrics, pairs))
        if error < separate and (best is None or error < best.error):
            best = SharedBasis(side, int(k), {p.name: pair for p, pair in zip(plans, pairs)}, error, int(k * cost), separate)
    return best
