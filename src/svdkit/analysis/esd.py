"""Empirical spectral densities: the eigenvalues ``lambda = s**2`` of weight matrices, fast.

One Gram product and one symmetric eigensolve per matrix; everything else in the analysis is
read from the eigenvalues. Three routes (``eigen_route``; not an SVD method, which
``svd_method`` names elsewhere in svdkit):

``"gram"``
    The Gram matrix of the smaller side, ``W^T W`` or ``W W^T`` (``M x M``, ``M = min(m, n)``),
    accumulated in float64, then its eigenvalues in float64. Exact to about ``1e-15 lambda_max``.
``"svd"``
    ``svdvals`` of the matrix in float64, squared: the reference, three to six times slower.
``"auto"`` (the default)
    ``"svd"`` for float64 weights. For float32 and 16-bit weights the Gram matrix is accumulated
    in float32 (half the time of float64 on the CPU, where NumPy's ``A.T @ A`` runs the BLAS
    symmetric rank-k update) and its eigenvalues are taken in float64; matrices small enough that
    the product costs nothing (:data:`GRAM32_MIN_FLOPS`) keep the float64 Gram.

Accuracy of ``"auto"``
----------------------
Rounding the Gram matrix to float32 perturbs it by ``E`` with ``||E||_2`` of a few ``eps32
lambda_max`` (``eps32 = 1.2e-7``); an eigenvalue moves by about ``u^T E u``, which averages the
rounding errors of the ``M**2`` entries: measured at ``1e-8 .. 5e-8 lambda_max`` on random
matrices from 768 to 11008 rows and up to ``3.5e-7 lambda_max`` on trained ones (all-MiniLM-L6-v2's
FFN outputs). :data:`GRAM32_RESOLUTION` (``1e-6 lambda_max``) is the documented bound, so singular
values are resolved down to ``sqrt(1e-6) = 1e-3 s_max``; eigenvalues below it are reported as 0:

- ``alpha``, ``lambda_max``, ``sum(lambda)``, the stable rank, the log norms and the energy ranks
  move by parts in ``1e6`` or less (the fit reads the tail, far above the resolution);
- the numerical rank counts ``s > max(max(m, n) * eps, 1e-3) * s_max`` (the usual tolerance, or
  the route's resolution where that is coarser), so rounding noise is never counted as rank;
- ``sigma_min`` and ``condition_number`` are reported only when ``sigma_min`` is resolved to 1 %
  (NaN otherwise: ``eigen_route="gram"`` gives them exactly).

The eigensolver is float64 on every route: a float32 one (LAPACK ``ssyevd``) errs by about
``sqrt(M) * eps32 * lambda_max``, 100 times more. On the CPU it is LAPACK's ``dsyevd``, from
NumPy's OpenBLAS below :data:`MKL_MIN_SIZE` and from torch's MKL above, whichever is faster at
that size (MKL's reduction wins on large matrices, OpenBLAS on small ones). Off the CPU the
Gram's eigenvalues are :func:`svdkit.linalg.gram_eigenvalues` (svdkit's one Gram eigensolve);
the CPU route keeps NumPy's BLAS ``syrk`` product and the faster LAPACK, as above.

Parallelism
-----------
On the CPU, LAPACK's symmetric eigensolver spends half its time in memory-bound matrix-vector
products that do not scale with threads, so independent matrices go to a pool of worker threads,
each running its BLAS/LAPACK calls on one thread (``workers``; default: torch's thread count).
While the pool runs, torch's intra-op thread count is set to 1 process-wide (and NumPy's BLAS is
limited through ``threadpoolctl`` when it is installed); both are restored afterwards. Besides
scaling, this avoids the stalls of spinning BLAS/OpenMP threads on a busy machine.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Literal, TypeVar

import numpy as np
import torch

from ..linalg import gram_eigenvalues, single_threaded, svdvals

__all__ = [
    "GRAM32_MIN_FLOPS",
    "GRAM32_RESOLUTION",
    "MKL_MIN_SIZE",
    "EigenRoute",
    "eigenvalues",
    "iter_eigenvalues",
    "resolution",
    "resolve_route",
    "sigma_floor",
]

EigenRoute = Literal["auto", "gram", "svd"]
_ROUTES = ("auto", "gram", "svd")
T = TypeVar("T")

#: Matrices whose Gram product costs fewer multiply-adds (``M * M * N``) keep the float64 Gram on "auto".
GRAM32_MIN_FLOPS = 1 << 28
#: Bound on ``|lambda_hat - lambda| / lambda_max`` of the float32-accumulated Gram route.
GRAM32_RESOLUTION = 1e-6
#: From this Gram size on, the CPU eigensolver is torch's (MKL) instead of NumPy's (OpenBLAS).
MKL_MIN_SIZE = 2560
_EPS64 = float(np.finfo(np.float64).eps)


def resolve_route(route: str, dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> str:
    """The route ``eigen_route=route`` takes for a weight of ``dtype`` and matrix ``shape``.

    Returns
    -------
    {"svd", "gram", "gram32"}
        ``"gram32"`` is the float32-accumulated Gram of ``"auto"``.

    Raises
    ------
    ValueError
        For an unknown route.
    """
    if route not in _ROUTES:
        raise ValueError(f"eigen_route must be one of {', '.join(map(repr, _ROUTES))}, got {route!r}")
    if route != "auto":
        return route
    if dtype == torch.float64:
        return "svd"
    if shape is not None:
        m, n = int(shape[-2]), int(shape[-1])
        if min(m, n) ** 2 * max(m, n) < GRAM32_MIN_FLOPS:
            return "gram"
    return "gram32"


def resolution(route: str) -> float:
    """Bound on ``|lambda_hat - lambda| / lambda_max`` for a route of :func:`resolve_route`."""
    return GRAM32_RESOLUTION if route == "gram32" else 64 * _EPS64


def _gram_cpu(W: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    A = W.detach().to(dtype).numpy()
    m, n = A.shape
    # NumPy dispatches ``A.T @ A`` and ``A @ A.T`` to the BLAS symmetric rank-k update (syrk).
    return A.T @ A if m >= n else A @ A.T


def _eigvalsh_cpu(G: np.ndarray) -> np.ndarray:
    """Ascending float64 eigenvalues of a symmetric (..., M, M) array, by the faster LAPACK."""
    G = np.asarray(G, dtype=np.float64)
    if G.shape[-1] >= MKL_MIN_SIZE:
        return torch.linalg.eigvalsh(torch.from_numpy(G)).numpy()
    return np.linalg.eigvalsh(G)


def _check_finite(G, W: torch.Tensor) -> None:
    # NaN and Inf entries poison the Gram matrix, which is smaller than W: check there.
    finite = bool(np.isfinite(G).all()) if isinstance(G, np.ndarray) else bool(torch.isfinite(G).all())
    if not finite:
        n_nan, n_inf = int(torch.isnan(W).sum()), int(torch.isinf(W).sum())
        if n_nan or n_inf:
            raise ValueError(f"matrix of shape {tuple(W.shape)} has non-finite entries: {n_nan} NaN and {n_inf} Inf")
        raise ValueError(f"the Gram matrix of a matrix of shape {tuple(W.shape)} overflows float32; use eigen_route='gram'")


def eigenvalues(W: torch.Tensor, route: EigenRoute = "auto") -> torch.Tensor:
    """Eigenvalues ``s**2`` of one matrix or a batch of same-shape matrices, descending.

    Parameters
    ----------
    W : Tensor of shape (..., m, n)
        Any real dtype and device; it is not modified.
    route : {"auto", "gram", "svd"}
        See the module docstring.

    Returns
    -------
    Tensor of shape (..., min(m, n)), float64, on ``W``'s device, descending, ``>= 0``.

    Raises
    ------
    ValueError
        For fewer than 2 dimensions, an empty matrix, NaN/Inf entries or an unknown route.
    """
    if W.ndim < 2 or W.shape[-1] == 0 or W.shape[-2] == 0:
        raise ValueError(f"expected a matrix of shape (..., m, n) with m, n >= 1, got {tuple(W.shape)}")
    route = resolve_route(route, W.dtype, tuple(W.shape))
    if route == "svd":
        return svdvals(W.detach().to(torch.float64)).square()
    m, n = W.shape[-2:]
    k = min(m, n)
    if W.device.type == "cpu":
        dtype = torch.float32 if route == "gram32" else torch.float64
        flat = W.reshape(-1, m, n)
        G = np.stack([_gram_cpu(w, dtype) for w in flat]).reshape(*W.shape[:-2], k, k)
        _check_finite(G, W)
        return torch.from_numpy(_eigvalsh_cpu(G)).flip(-1).clamp_min_(0.0)
    Wd = W.detach().to(torch.float32 if route == "gram32" else torch.float64)
    G = Wd.mT @ Wd if m >= n else Wd @ Wd.mT
    _check_finite(G, W)
    return gram_eigenvalues(G)


def iter_eigenvalues(
    jobs: Iterable[T],
    compute: Callable[[T], object],
    *,
    workers: int | None = None,
    on_cpu: bool = True,
) -> Iterator[tuple[T, object]]:
    """Apply ``compute`` to each job, in order, on a pool of single-threaded workers.

    Parameters
    ----------
    jobs : iterable
        Work items, consumed lazily: at most ``2 * workers`` are in flight, so a lazy source (a
        checkpoint read one tensor at a time) keeps only that many tensors alive.
    compute : callable
        ``job -> result``; exceptions are returned in place of the result, not raised.
    workers : int, optional
        Worker threads; default ``torch.get_num_threads()`` on the CPU. ``1`` runs inline.
    on_cpu : bool
        Off the CPU the work runs inline (the device parallelises itself).

    Yields
    ------
    (job, result or Exception)
    """
    workers = torch.get_num_threads() if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")

    def guarded(job):
        try:
            return compute(job)
        except Exception as exc:  # reported per job by the caller
            return exc

    if not on_cpu:
        for job in jobs:
            yield job, guarded(job)
        return
    if workers == 1:
        with single_threaded():
            for job in jobs:
                yield job, guarded(job)
        return
    with single_threaded(), ThreadPoolExecutor(max_workers=workers) as pool:
        pending: list[tuple[T, object]] = []
        for job in jobs:
            pending.append((job, pool.submit(guarded, job)))
            if len(pending) >= 2 * workers:
                first, future = pending.pop(0)
                yield first, future.result()
        for job, future in pending:
            yield job, future.result()


def sigma_floor(route: str) -> float:
    """Smallest ``s / s_max`` a route resolves: ``sqrt`` of :func:`resolution`."""
    return math.sqrt(resolution(route))
