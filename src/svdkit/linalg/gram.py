"""The thin SVD of a matrix through the eigendecomposition of its smaller Gram matrix.

For ``M`` (m, n) with ``m >= n``: ``M^T M = V diag(S**2) V^T``, and ``U = M V diag(1/S)``; for
``m < n`` the same on ``M M^T``. One symmetric eigensolve of the short side costs about a third
of an SVD of ``M``, which is what compression needs when it factorizes hundreds of whitened
weights. The price is the squared condition number: singular values below about
``sqrt(eps) * s_max`` (1.5e-8 in float64) come out as noise, and so do their vectors.
The factors stay exact in the sense that matters for truncation: for every ``k``,
``U_k diag(S_k) Vh_k = M V_k V_k^T`` (or ``U_k U_k^T M``), the projection of ``M`` on the
computed top-``k`` singular subspace, whatever the accuracy of the smallest values.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .svd import SVDResult, svd_flip

__all__ = ["SMALL_EIGENSOLVE", "gram_eigenvalues", "gram_svd", "gram_svdvals", "single_threaded"]

#: Symmetric eigensolves of this side or smaller run on one thread: LAPACK's threaded ``syevd``
#: gains little on them, and on a machine whose cores are busy its threads wait on each other
#: (a 576 x 576 float64 ``eigvalsh`` measured 0.03 s on one thread, 0.8-2.9 s on two).
SMALL_EIGENSOLVE = 2048


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch and (when ``threadpoolctl`` is installed) NumPy's BLAS on one thread inside."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    limits: contextlib.AbstractContextManager = contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits

        limits = threadpool_limits(1)
    except ImportError:  # pragma: no cover - depends on the environment
        pass
    try:
        with limits:
            yield
    finally:
        torch.set_num_threads(before)


def _eigensolve_threads(side: int, device: torch.device) -> contextlib.AbstractContextManager:
    small = device.type == "cpu" and side <= SMALL_EIGENSOLVE
    return single_threaded() if small and torch.get_num_threads() > 1 else contextlib.nullcontext()


def gram_svd(M: torch.Tensor) -> SVDResult:
    """Thin SVD of a real matrix from the eigendecomposition of ``M^T M`` or ``M M^T``.

    Parameters
    ----------
    M : Tensor of shape (m, n)
        Factorized in float64 (the result is float64).

    Returns
    -------
    SVDResult
        ``U`` (m, r), ``S`` (r,) descending and non-negative, ``Vh`` (r, n), ``r = min(m, n)``;
        signs fixed as by :func:`svdkit.linalg.svd_flip`. Columns of a zero singular value are
        zero.
    """
    if not isinstance(M, torch.Tensor) or M.ndim != 2:
        raise ValueError(f"gram_svd takes one matrix (a 2-D tensor), got {getattr(M, 'shape', type(M).__name__)}")
    if M.layout != torch.strided:
        raise TypeError("gram_svd takes a dense tensor; use randomized_svd for sparse input")
    M = M.to(torch.float64)
    tall = M.shape[0] >= M.shape[1]
    gram = M.T @ M if tall else M @ M.T
    with _eigensolve_threads(gram.shape[0], gram.device):
        values, vectors = torch.linalg.eigh(gram)
    values, vectors = values.flip(0), vectors.flip(1)
    S = values.clamp_min(0).sqrt()
    inverse = torch.where(S > 0, 1.0 / S.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(S))
    if tall:
        V = vectors
        U = (M @ V) * inverse
        U, Vh = svd_flip(U, V.T)
    else:
        U = vectors
        Vh = (U.T @ M) * inverse.unsqueeze(1)
        U, Vh = svd_flip(U, Vh)
    return SVDResult(U, S, Vh)


def gram_eigenvalues(G: torch.Tensor) -> torch.Tensor:
    """The eigenvalues of a symmetric positive semi-definite (Gram) matrix, descending, float64.

    Parameters
    ----------
    G : Tensor of shape (..., d, d)
        A Gram matrix ``X^T X`` (its eigenvalues are the squared singular values of ``X``).

    Returns
    -------
    Tensor of shape (..., d), float64, descending, clamped at 0 (rounding makes the smallest
    ones slightly negative).
    """
    with _eigensolve_threads(G.shape[-1], G.device):
        return torch.linalg.eigvalsh(G.to(torch.float64)).flip(-1).clamp_min(0)


def gram_svdvals(M: torch.Tensor) -> torch.Tensor:
    """The singular values of ``M`` (m, n) from the eigenvalues of its smaller Gram matrix.

    A symmetric eigensolve of the short side instead of an SVD; it squares the condition number,
    so values below about ``1e-8 * s_max`` come out as noise (float64).

    Returns
    -------
    Tensor of shape (min(m, n),), float64, descending.
    """
    M = M.to(torch.float64)
    return gram_eigenvalues(M.T @ M if M.shape[0] >= M.shape[1] else M @ M.T).sqrt()
