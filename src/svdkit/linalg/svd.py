"""Robust, batched, sign-deterministic singular value decomposition.

Sign convention
---------------
Singular vectors are only defined up to sign. svdkit fixes them the way scikit-learn's
``svd_flip(u_based_decision=True)`` does: for every component ``j`` the entry of largest
magnitude in ``U[..., :, j]`` is made positive, and ``Vh[..., j, :]`` is flipped with it, so
``U @ diag(S) @ Vh`` is unchanged. The same input therefore gives the same factors on any
device and with any LAPACK build, up to rounding (for repeated singular values only the
subspace is defined, not the individual vectors).
"""

from __future__ import annotations

import warnings
from typing import Callable, NamedTuple

import numpy as np
import torch

from ._tensor import Array, check_representable, prepare, to_tensor

__all__ = ["SVDResult", "SVDFallbackWarning", "svd", "svdvals", "svd_flip"]

_CUDA_DRIVERS = ("gesvd", "gesvdj", "gesvda")


class SVDResult(NamedTuple):
    """Thin SVD ``A = U @ diag(S) @ Vh``.

    Attributes
    ----------
    U : Tensor or ndarray of shape (..., m, k)
    S : Tensor or ndarray of shape (..., k), descending
    Vh : Tensor or ndarray of shape (..., k, n)
    """

    U: Array
    S: Array
    Vh: Array


class SVDFallbackWarning(RuntimeWarning):
    """A decomposition failed to converge and was recomputed another way."""


def svd_flip(U: Array, Vh: Array, *, u_based: bool = True) -> tuple[Array, Array]:
    """Make singular vectors sign-deterministic.

    Parameters
    ----------
    U : Tensor or ndarray of shape (..., m, k)
    Vh : Tensor or ndarray of shape (..., k, n)
    u_based : bool
        If True, the largest-magnitude entry of each column of ``U`` becomes positive;
        otherwise the largest-magnitude entry of each row of ``Vh``.

    Returns
    -------
    U, Vh : same types and shapes as the inputs, with matching signs flipped.
    """
    Ut, from_numpy = to_tensor(U, caller="svd_flip")
    Vt, _ = to_tensor(Vh, caller="svd_flip")
    if u_based:
        pivot = Ut.abs().argmax(dim=-2, keepdim=True)  # (..., 1, k)
        signs = torch.gather(Ut, -2, pivot).sign()
    else:
        pivot = Vt.abs().argmax(dim=-1, keepdim=True)  # (..., k, 1)
        signs = torch.gather(Vt, -1, pivot).sign().transpose(-1, -2)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    Ut = Ut * signs
    Vt = Vt * signs.transpose(-1, -2)
    if from_numpy:
        return Ut.numpy(), Vt.numpy()
    return Ut, Vt


def _scipy_linalg():
    """``scipy.linalg``, or None when SciPy is not installed (it is an optional dependency)."""
    try:
        import scipy.linalg
    except ImportError:
        return None
    return scipy.linalg


def _scipy_gesvd(A: torch.Tensor, compute_uv: bool, full_matrices: bool):
    import scipy.linalg

    batch = A.shape[:-2]
    mats = A.detach().to("cpu", torch.float64).reshape(-1, *A.shape[-2:]).numpy()
    outs = [
        scipy.linalg.svd(M, full_matrices=full_matrices, compute_uv=compute_uv, lapack_driver="gesvd")
        for M in mats
    ]
    if not compute_uv:
        S = np.stack(outs).reshape(*batch, -1)
        return torch.from_numpy(S).to(A.device, A.dtype)
    U, S, Vh = (np.stack(part) for part in zip(*outs))
    to = lambda X: torch.from_numpy(X).to(A.device, A.dtype)  # noqa: E731
    return (
        to(U).reshape(*batch, *U.shape[-2:]),
        to(S).reshape(*batch, -1),
        to(Vh).reshape(*batch, *Vh.shape[-2:]),
    )


def _with_fallback(compute: Callable, A: torch.Tensor, driver: str | None, what: str, scipy_call: Callable):
    """Run ``compute(A, driver)``; on a LAPACK/cuSOLVER failure try the next route, with a warning.

    When every route fails, the first error is raised again. SciPy's route is skipped when SciPy
    is not installed; the error then carries a note saying so.
    """
    try:
        return compute(A, driver)
    except torch.linalg.LinAlgError as exc:
        first_error = exc
    routes: list[tuple[str, Callable]] = []
    if A.is_cuda and driver != "gesvd":
        routes.append(("the CUDA gesvd driver", lambda: compute(A, "gesvd")))
    if A.dtype != torch.float64:
        routes.append(("float64", lambda: _cast(compute(A.double(), driver), A.dtype)))
    missing_scipy = _scipy_linalg() is None
    if not missing_scipy:
        routes.append(("scipy's gesvd", lambda: scipy_call(A)))
    for label, route in routes:
        try:
            result = route()
        except (torch.linalg.LinAlgError, np.linalg.LinAlgError):
            continue
        warnings.warn(
            f"{what} of a {tuple(A.shape)} {A.dtype} input did not converge ({first_error}); "
            f"recomputed with {label}",
            SVDFallbackWarning,
            stacklevel=3,
        )
        return result
    if missing_scipy and hasattr(first_error, "add_note"):
        first_error.add_note("SciPy's gesvd, the last fallback, was not tried: scipy is not installed (pip install scipy)")
    raise first_error


def _cast(result, dtype: torch.dtype):
    if isinstance(result, torch.Tensor):
        return result.to(dtype)
    return tuple(part.to(dtype) for part in result)


def _check_driver(driver: str | None) -> None:
    if driver is not None and driver not in _CUDA_DRIVERS:
        raise ValueError(f"driver must be None or one of {_CUDA_DRIVERS}, got {driver!r}")


def svd(A: Array, full_matrices: bool = False, *, driver: str | None = None) -> SVDResult:
    """Singular value decomposition with deterministic signs and fallbacks.

    Parameters
    ----------
    A : Tensor or ndarray of shape (..., m, n)
        Real input. float16/bfloat16 are decomposed in float32 and the factors cast back.
    full_matrices : bool
        If False (default) return the thin factors with ``k = min(m, n)``.
    driver : {None, "gesvd", "gesvdj", "gesvda"}
        cuSOLVER driver for CUDA tensors. CPU tensors always use LAPACK (``gesdd``) and ignore it.

    Returns
    -------
    SVDResult
        ``U`` of shape (..., m, k), ``S`` of shape (..., k) in descending order, ``Vh`` of shape
        (..., k, n); NumPy in, NumPy out; tensors stay on their device.

    Raises
    ------
    ValueError
        For fewer than 2 dimensions, an empty input, NaN/Inf entries (the message counts them), or
        a finite input whose singular values overflow the dtype (float32, or float16 on the way
        back): never a silent ``inf``.
    TypeError
        For sparse input (``torch.sparse_*`` tensors, ``scipy.sparse`` matrices): a full SVD needs
        the dense matrix; :func:`svdkit.linalg.randomized_svd` takes sparse input.
    torch.linalg.LinAlgError
        When every route below fails to converge: the first failure.

    Notes
    -----
    If the decomposition fails to converge it is retried with cuSOLVER's ``gesvd`` (CUDA), in
    float64, and finally with SciPy's ``gesvd`` (skipped when SciPy is not installed); each
    fallback emits :class:`SVDFallbackWarning`. Signs follow the convention in this module's
    docstring.
    """
    _check_driver(driver)
    T, restore = prepare(A, caller="svd")

    def compute(X: torch.Tensor, drv: str | None):
        kwargs = {"driver": drv} if (drv is not None and X.is_cuda) else {}
        return torch.linalg.svd(X, full_matrices=full_matrices, **kwargs)

    U, S, Vh = _with_fallback(
        compute, T, driver, "SVD", lambda X: _scipy_gesvd(X, True, full_matrices)
    )
    check_representable(S, restore.dtype, tuple(T.shape), restore.input_dtype)
    k = S.shape[-1]
    U_k, Vh_k = svd_flip(U[..., :k], Vh[..., :k, :])
    if full_matrices:
        U = torch.cat([U_k, U[..., k:]], dim=-1)
        Vh = torch.cat([Vh_k, Vh[..., k:, :]], dim=-2)
    else:
        U, Vh = U_k, Vh_k
    return SVDResult(restore(U), restore(S), restore(Vh))


def svdvals(A: Array, *, driver: str | None = None) -> Array:
    """Singular values in descending order.

    Parameters
    ----------
    A : Tensor or ndarray of shape (..., m, n)
    driver : {None, "gesvd", "gesvdj", "gesvda"}
        cuSOLVER driver for CUDA tensors; ignored on the CPU.

    Returns
    -------
    Tensor or ndarray of shape (..., min(m, n))

    Raises
    ------
    ValueError, TypeError, torch.linalg.LinAlgError
        As :func:`svd`: bad or non-finite input, singular values that overflow the dtype, sparse input.

    Notes
    -----
    Same validation and fallbacks as :func:`svd`.
    """
    _check_driver(driver)
    T, restore = prepare(A, caller="svdvals")

    def compute(X: torch.Tensor, drv: str | None):
        if drv is not None and X.is_cuda:
            return torch.linalg.svd(X, full_matrices=False, driver=drv).S
        return torch.linalg.svdvals(X)

    S = _with_fallback(compute, T, driver, "svdvals", lambda X: _scipy_gesvd(X, False, False))
    check_representable(S, restore.dtype, tuple(T.shape), restore.input_dtype)
    return restore(S)
