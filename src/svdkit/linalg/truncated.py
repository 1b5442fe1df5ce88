"""Best rank-k approximation with the numbers that describe it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ._sparse import sparse_operator, sum_squares
from ._tensor import Array, prepare, sparse_description
from .randomized import check_seed, randomized_svd
from .rank import RankLike, resolve_rank
from .svd import SVDResult, svd

__all__ = ["SVDMethod", "SVD_METHODS", "TruncationStats", "split_factors", "truncated_svd", "uses_randomized"]

#: How a truncated SVD is computed (``svd_method=`` everywhere in svdkit).
SVDMethod = Literal["auto", "exact", "randomized"]
SVD_METHODS: tuple[str, ...] = ("auto", "exact", "randomized")
Balance = Literal["sqrt", "left", "right"]


def split_factors(
    U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, *, balance: Balance = "sqrt", scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``U diag(S) Vh / scale`` into two factors ``left @ right``.

    Every factorized layer, compression method and LoRA init of svdkit splits its SVD here.

    Parameters
    ----------
    U : Tensor of shape (..., m, k)
    S : Tensor of shape (..., k)
        Non-negative (negative rounding noise is clamped to 0).
    Vh : Tensor of shape (..., k, n)
    balance : {"sqrt", "left", "right"}
        Where the singular values go: ``"sqrt"`` (default) gives each factor ``sqrt(S)``, so both
        are equally scaled; ``"left"`` gives ``(U S, Vh)``; ``"right"`` gives ``(U, S Vh)``.
    scale : float
        Divide the product by this (``> 0``). LoRA's update is ``s * B @ A``, so
        ``B, A = split_factors(U, S, Vh, scale=s)`` gives ``s * B @ A = U diag(S) Vh``.

    Returns
    -------
    left : Tensor of shape (..., m, k)
    right : Tensor of shape (..., k, n)
        In the dtype of the inputs.
    """
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    values = S.clamp_min(0) / scale
    if balance == "sqrt":
        root = values.sqrt()
        return U * root.unsqueeze(-2), root.unsqueeze(-1) * Vh
    if balance == "left":
        return U * values.unsqueeze(-2), Vh
    if balance == "right":
        return U, values.unsqueeze(-1) * Vh
    raise ValueError(f"balance must be 'sqrt', 'left' or 'right', got {balance!r}")


def uses_randomized(svd_method: str, rank: RankLike, shape: tuple[int, ...]) -> bool:
    """Whether :func:`truncated_svd` of a dense matrix of ``shape`` (..., m, n) takes the randomized
    route: ``"randomized"`` with an int rank, or ``"auto"`` with an int rank below a tenth of
    ``min(m, n)``. A rank spec always takes the exact route (it needs the full spectrum)."""
    is_int = isinstance(rank, (int, np.integer)) and not isinstance(rank, bool)
    m, n = int(shape[-2]), int(shape[-1])
    return is_int and (svd_method == "randomized" or (svd_method == "auto" and rank < 0.1 * min(m, n)))


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
    svd_method: SVDMethod = "exact",
    seed: int | None = 0,
    n_iter: int | Literal["auto"] = "auto",
    oversamples: int = 10,
) -> tuple[SVDResult, TruncationStats]:
    """Rank-``k`` factors of ``A`` and the statistics of the truncation.

    Parameters
    ----------
    A : Tensor, ndarray or sparse matrix of shape (..., m, n)
        Sparse input (``scipy.sparse``, torch COO/CSR/CSC; one matrix) needs an int ``rank`` and
        the randomized method (``"auto"`` picks it for sparse input whatever the rank).
    rank : int or RankSpec
        A spec (``Energy``, ``ErrorTol``, ...) needs the full spectrum and a single dense matrix.
    svd_method : {"exact", "randomized", "auto"}
        The decomposition; ``"auto"`` uses :func:`randomized_svd` when an int rank is below a
        tenth of ``min(m, n)`` (and always for sparse input).
    seed : int or None
        Seed for the randomized method (checked also when the exact method ignores it).
    n_iter, oversamples
        Passed to :func:`randomized_svd` (ignored by the exact method).

    Returns
    -------
    factors : SVDResult
        ``U`` (..., m, k), ``S`` (..., k), ``Vh`` (..., k, n).
    stats : TruncationStats
        Errors are floats for a single matrix and tensors of shape (...) for a batch.

    Raises
    ------
    TypeError
        For sparse input with ``svd_method="exact"`` or a rank spec (both need the dense
        matrix), or a seed that is not an int or None.

    Notes
    -----
    The error follows from orthogonality: ``||A - U_k S_k V_k^T||_F^2 = ||A||_F^2 - sum(s_k**2)``
    for both methods (the randomized factors are a Rayleigh-Ritz projection of ``A``).
    """
    check_seed(seed)
    if svd_method not in SVD_METHODS:
        raise ValueError(f"svd_method must be 'exact', 'randomized' or 'auto', got {svd_method!r}")
    is_int = isinstance(rank, (int, np.integer)) and not isinstance(rank, bool)
    if sparse_description(A) is not None:
        return _truncated_sparse(A, rank, is_int, svd_method, seed=seed, n_iter=n_iter, oversamples=oversamples)
    T, restore = prepare(A, caller="truncated_svd")
    m, n = T.shape[-2:]
    if not is_int and T.ndim != 2:
        raise ValueError(f"rank spec {rank!r} needs a single matrix, got shape {tuple(T.shape)}; pass an int rank for batches")
    randomized = uses_randomized(svd_method, rank, (m, n))
    if randomized:
        k = resolve_rank(None, rank, (m, n))
        U, S, Vh = randomized_svd(T, k, seed=seed, n_iter=n_iter, oversamples=oversamples)
        total = sum_squares(T, dim=(-2, -1))
        lost = (total - S.double().square().sum(dim=-1)).clamp_min(0)
    else:
        U, S, Vh = svd(T)
        k = resolve_rank(S if T.ndim == 2 else None, rank, (m, n))
        power = S.double().square()
        total, lost = power.sum(dim=-1), power[..., k:].sum(dim=-1)
        U, S, Vh = U[..., :k], S[..., :k], Vh[..., :k, :]
    stats = _stats(total, lost, k, m, n, single=T.ndim == 2)
    return SVDResult(restore(U), restore(S), restore(Vh)), stats


def _truncated_sparse(A, rank, is_int: bool, svd_method: str, **randomized) -> tuple[SVDResult, TruncationStats]:
    """:func:`truncated_svd` of a sparse matrix: the randomized method only, by products."""
    if svd_method == "exact" or not is_int:
        raise TypeError(
            f"truncated_svd() of sparse input ({sparse_description(A)} of shape {tuple(A.shape)}) takes an int "
            f"rank and svd_method='randomized' or 'auto' (svdkit.linalg.randomized_svd, by products), got rank={rank!r}, svd_method={svd_method!r}: an exact "
            f"SVD or a rank spec needs the dense matrix (densify it with .to_dense() / .toarray() if it fits)"
        )
    op, _, shape = sparse_operator(A)
    m, n = shape
    k = resolve_rank(None, rank, (m, n))
    U, S, Vh = randomized_svd(A, k, **randomized)
    total = op.frobenius_sq()
    lost = (total - torch.as_tensor(S).double().square().sum()).clamp_min(0)
    return SVDResult(U, S, Vh), _stats(total, lost, k, m, n, single=True)


def _stats(total: torch.Tensor, lost: torch.Tensor, k: int, m: int, n: int, *, single: bool) -> TruncationStats:
    nonzero = total > 0
    error = torch.where(nonzero, (lost / total.clamp_min(1e-300)).sqrt(), torch.zeros_like(total)).clamp(max=1.0)
    retained = torch.where(nonzero, 1 - lost / total.clamp_min(1e-300), torch.ones_like(total))
    if single:
        retained, error = float(retained), float(error)
    return TruncationStats(
        rank=k,
        compression_ratio=m * n / (k * (m + n)),
        relative_error=error,
        retained_energy=retained,
    )
