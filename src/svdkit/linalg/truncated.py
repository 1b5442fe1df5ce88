"""Best rank-k approximation with the numbers that describe it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ._tensor import Array, prepare
from .randomized import randomized_svd
from .rank import RankLike, resolve_rank
from .svd import SVDResult, svd

__all__ = ["TruncationStats", "truncated_svd"]


@dataclass(frozen=True)
class TruncationStats:
    """How good a rank-``rank`` factorization of an ``m x n`` matrix is.

    Attributes
    ----------
    rank : int
    compression_ratio : float
        ``m * n / (rank * (m + n))``: dense parameters per factorized parameter (> 1 saves).
    relative_error : float or Tensor of shape (...)
        ``||A - U S Vh||_F / ||A||_F`` (0 for a zero matrix).
    retained_energy : float or Tensor of shape (...)
        ``sum_{i<=k} s_i**2 / ||A||_F**2`` (1 for a zero matrix).
    """

    rank: int
    compression_ratio: float
    relative_error: float | torch.Tensor
    retained_energy: float | torch.Tensor


def truncated_svd(
    A: Array,
    rank: RankLike,
    *,
    method: Literal["exact", "randomized", "auto"] = "exact",
    seed: int | None = 0,
) -> tuple[SVDResult, TruncationStats]:
    """Rank-``k`` factors of ``A`` and the statistics of the truncation.

    Parameters
    ----------
    A : Tensor or ndarray of shape (..., m, n)
    rank : int or RankSpec
        A spec (``Energy``, ``ErrorTol``, ...) needs the full spectrum and a single matrix.
    method : {"exact", "randomized", "auto"}
        ``"auto"`` uses :func:`randomized_svd` when an int rank is below a tenth of ``min(m, n)``.
    seed : int or None
        Seed for the randomized method.

    Returns
    -------
    factors : SVDResult
        ``U`` (..., m, k), ``S`` (..., k), ``Vh`` (..., k, n).
    stats : TruncationStats
        Errors are floats for a single matrix and tensors of shape (...) for a batch.

    Notes
    -----
    The error follows from orthogonality: ``||A - U_k S_k V_k^T||_F^2 = ||A||_F^2 - sum(s_k**2)``
    for both methods (the randomized factors are a Rayleigh-Ritz projection of ``A``).
    """
    T, restore = prepare(A)
    m, n = T.shape[-2:]
    is_int = isinstance(rank, int) and not isinstance(rank, bool)
    if not is_int and T.ndim != 2:
        raise ValueError(f"rank spec {rank!r} needs a single matrix, got shape {tuple(T.shape)}; pass an int rank for batches")
    if method not in ("exact", "randomized", "auto"):
        raise ValueError(f"method must be 'exact', 'randomized' or 'auto', got {method!r}")
    randomized = is_int and (method == "randomized" or (method == "auto" and rank < 0.1 * min(m, n)))
    if randomized:
        k = resolve_rank(None, rank, (m, n))
        U, S, Vh = randomized_svd(T, k, seed=seed)
        total = T.double().square().sum(dim=(-2, -1))
        lost = (total - S.double().square().sum(dim=-1)).clamp_min(0)
    else:
        U, S, Vh = svd(T)
        k = resolve_rank(S if T.ndim == 2 else None, rank, (m, n))
        power = S.double().square()
        total, lost = power.sum(dim=-1), power[..., k:].sum(dim=-1)
        U, S, Vh = U[..., :k], S[..., :k], Vh[..., :k, :]
    nonzero = total > 0
    error = torch.where(nonzero, (lost / total.clamp_min(1e-300)).sqrt(), torch.zeros_like(total)).clamp(max=1.0)
    retained = torch.where(nonzero, 1 - lost / total.clamp_min(1e-300), torch.ones_like(total))
    if T.ndim == 2:
        retained, error = float(retained), float(error)
    stats = TruncationStats(
        rank=k,
        compression_ratio=m * n / (k * (m + n)),
        relative_error=error,
        retained_energy=retained,
    )
    return SVDResult(restore(U), restore(S), restore(Vh)), stats
