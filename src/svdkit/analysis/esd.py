"""Empirical spectral densities: the eigenvalues ``lambda = s**2`` of weight matrices, fast.

Two routes give the same eigenvalues:

``"gram"``
    The Gram matrix of the smaller side, ``W^T W`` or ``W W^T`` (``M x M`` with
    ``M = min(m, n)``), formed in float64, then its eigenvalues (``eigvalsh``). On the CPU the
    product goes through NumPy, whose BLAS recognises ``A.T @ A`` and runs the symmetric rank-k
    update (half the flops of a general product); on a GPU it is a batched ``bmm``.
``"svd"``
    ``svdvals`` of the matrix in float64, squared: the reference, two to four times slower.

``"auto"`` (the default) takes ``"gram"`` for float32 and half-precision weights and ``"svd"``
for float64 weights.

Accuracy
--------
Forming ``W^T W`` squares the condition number, so the Gram route resolves each eigenvalue to an
absolute error of about ``c * eps64 * lambda_max`` (``eps64 = 2.2e-16``; ``c`` grows slowly with
``M``), i.e. singular values to about ``sqrt(c * eps64) * s_max`` ~ ``1e-7 s_max`` near zero. That
is far below what any metric here reads from a float32 (or half) weight: the numerical-rank
tolerance ``max(m, n) * eps32 * s_max`` (``eps32 = 1.2e-7``) is larger by orders of magnitude, the
power-law fit only reads ``lambda > 1e-5``, and norms and stable rank only read ``sum(lambda)`` and
``lambda_max``. A float64 weight's own tolerance (``eps64``) is below that floor, hence ``"svd"``
for float64. Eigenvalues come back clamped at 0 (rounding can leave ``-1e-17``).

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

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Literal, TypeVar

import torch

from ..linalg import svdvals

__all__ = ["Method", "eigenvalues", "iter_eigenvalues", "resolve_method", "single_threaded"]

Method = Literal["auto", "gram", "svd"]
_METHODS = ("auto", "gram", "svd")
T = TypeVar("T")


def resolve_method(method: str, dtype: torch.dtype) -> str:
    """The route ``method`` takes for a weight of ``dtype`` (``"gram"`` or ``"svd"``)."""
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if method != "auto":
        return method
    return "svd" if dtype == torch.float64 else "gram"


def _gram_cpu(W: torch.Tensor) -> torch.Tensor:
    A = W.detach().to(torch.float64).numpy()
    m, n = A.shape
    # NumPy dispatches ``A.T @ A`` and ``A @ A.T`` to the BLAS symmetric rank-k update (syrk).
    G = A.T @ A if m >= n else A @ A.T
    return torch.from_numpy(G)


def eigenvalues(W: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """Eigenvalues ``s**2`` of one matrix or a batch of same-shape matrices, descending.

    Parameters
    ----------
    W : Tensor of shape (..., m, n)
        Any real dtype and device; it is not modified.
    method : {"auto", "gram", "svd"}
        See the module docstring.

    Returns
    -------
    Tensor of shape (..., min(m, n)), float64, on ``W``'s device, descending, ``>= 0``.

    Raises
    ------
    ValueError
        For fewer than 2 dimensions, an empty matrix, NaN/Inf entries or an unknown method.
    """
    if W.ndim < 2 or W.shape[-1] == 0 or W.shape[-2] == 0:
        raise ValueError(f"expected a matrix of shape (..., m, n) with m, n >= 1, got {tuple(W.shape)}")
    route = resolve_method(method, W.dtype)
    if route == "svd":
        S = svdvals(W.detach().to(torch.float64))
        return S.square()
    m, n = W.shape[-2:]
    if W.device.type == "cpu":
        flat = W.reshape(-1, m, n)
        G = torch.stack([_gram_cpu(w) for w in flat]).reshape(*W.shape[:-2], min(m, n), min(m, n))
    else:
        Wd = W.detach().to(torch.float64)
        G = Wd.mT @ Wd if m >= n else Wd @ Wd.mT
    # NaN and Inf entries poison the Gram matrix, which is smaller than W: check there.
    if not bool(torch.isfinite(G).all()):
        n_nan, n_inf = int(torch.isnan(W).sum()), int(torch.isinf(W).sum())
        raise ValueError(f"matrix of shape {tuple(W.shape)} has non-finite entries: {n_nan} NaN and {n_inf} Inf")
    lam = torch.linalg.eigvalsh(G)  # ascending
    return lam.flip(-1).clamp_min_(0.0)


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch and (when ``threadpoolctl`` is installed) NumPy's BLAS on one thread inside."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    limits = contextlib.nullcontext()
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

    if workers == 1 or not on_cpu:
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
