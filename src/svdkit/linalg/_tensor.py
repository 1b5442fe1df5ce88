"""Input handling shared by the ``linalg`` functions.

Every public ``linalg`` function accepts a NumPy array or a torch tensor. NumPy input is
computed on the CPU and returned as NumPy; tensors keep their device. Half precision is
computed in float32 and the results are cast back to the input dtype.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch

Array = Any  # a torch.Tensor or a numpy.ndarray

_HALF = (torch.float16, torch.bfloat16)


def sparse_description(A: Any) -> str | None:
    """``"a torch.sparse_csr tensor"``, ``"a scipy.sparse csr_matrix"``, ...; None for dense input."""
    if isinstance(A, torch.Tensor):
        return None if A.layout == torch.strided else f"a {A.layout} tensor"
    sparse = sys.modules.get("scipy.sparse")  # a scipy.sparse matrix implies scipy.sparse is imported
    if sparse is not None and sparse.issparse(A):
        return f"a scipy.sparse {type(A).__name__}"
    return None


def refuse_sparse(A: Any, caller: str | None) -> None:
    """Raise ``TypeError`` for sparse input, naming the function and pointing to ``randomized_svd``."""
    what = sparse_description(A)
    if what is None:
        return
    where = f"{caller}()" if caller else "this function"
    raise TypeError(
        f"{where} does not take sparse input (got {what} of shape {tuple(A.shape)}): it needs the dense "
        f"matrix. svdkit.linalg.randomized_svd works on sparse matrices through products with A and A^T, "
        f"never densifying them; or densify first (.to_dense() / .toarray()) if the matrix fits in memory"
    )


def to_tensor(A: Array, *, caller: str | None = None) -> tuple[torch.Tensor, bool]:
    """Return ``A`` as a tensor and whether it came in as NumPy; sparse input raises ``TypeError``."""
    refuse_sparse(A, caller)
    if isinstance(A, torch.Tensor):
        return A, False
    if isinstance(A, np.ndarray) or np.isscalar(A) or isinstance(A, (list, tuple)):
        arr = np.asarray(A)
        if arr.dtype.kind not in "biufc":
            raise TypeError(f"expected a torch.Tensor or numpy.ndarray of numbers, got {type(A).__name__} of dtype {arr.dtype}")
        if arr.dtype.kind in "biu":
            arr = arr.astype(np.float64)
        if not arr.flags.c_contiguous or any(stride < 0 for stride in arr.strides):
            # A C-ordered copy. (np.ascontiguousarray would keep the negative stride of a reversed
            # 1-element array, which torch rejects, and turn a 0-d array into a 1-d one.)
            arr = np.array(arr, order="C")
        return torch.from_numpy(arr), True
    raise TypeError(f"expected a torch.Tensor or numpy.ndarray, got {type(A).__name__}")


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a decomposition runs in: float32 for half types and integers, else unchanged."""
    if dtype in (torch.float32, torch.float64):
        return dtype
    if dtype.is_complex:
        raise TypeError(f"complex input ({dtype}) is not supported; svdkit works on real matrices")
    return torch.float32


def check_matrix(A: torch.Tensor, *, name: str = "A", finite: bool = True) -> None:
    """Raise ``ValueError`` unless ``A`` is a non-empty batch of matrices, finite unless ``finite=False``."""
    if A.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (..., m, n); got shape {tuple(A.shape)}")
    if A.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(A.shape)}); a decomposition needs m, n >= 1")
    # A sum is a cheap single pass that NaN and Inf both poison; only a non-finite sum (which
    # overflow can also cause) pays for the exact, allocating check.
    if finite and A.dtype.is_floating_point and not bool(torch.isfinite(A.sum())) and not bool(torch.isfinite(A).all()):
        n_nan = int(torch.isnan(A).sum())
        n_inf = int(torch.isinf(A).sum())
        raise ValueError(
            f"{name} of shape {tuple(A.shape)} has non-finite entries: {n_nan} NaN and {n_inf} Inf"
        )


class Restore:
    """Casts results back to the caller's dtype (and to NumPy for NumPy input).

    Attributes
    ----------
    dtype : torch.dtype
        The dtype results are returned in.
    input_dtype : torch.dtype
        The dtype ``A`` came in with (for messages).
    from_numpy : bool
    """

    def __init__(self, dtype: torch.dtype, input_dtype: torch.dtype, from_numpy: bool) -> None:
        self.dtype = dtype
        self.input_dtype = input_dtype
        self.from_numpy = from_numpy

    def __call__(self, X: torch.Tensor) -> Array:
        X = X.to(self.dtype)
        return X.numpy() if self.from_numpy else X


def prepare(
    A: Array, *, name: str = "A", check_finite: bool = True, caller: str | None = None
) -> tuple[torch.Tensor, Restore]:
    """Validate ``A`` and return it in its working dtype with a function that restores outputs.

    The restore function casts a result back to the caller's dtype and, for NumPy input,
    converts it to a NumPy array. With ``check_finite=False`` the caller takes over the NaN/Inf
    check (for example on a sketch ``A @ Omega``, which any non-finite entry poisons) and calls
    :func:`check_matrix` when it fails. Sparse input raises ``TypeError`` naming ``caller``.
    """
    T, from_numpy = to_tensor(A, caller=caller)
    out_dtype = T.dtype if T.dtype.is_floating_point else torch.float64 if from_numpy else torch.float32
    work = working_dtype(T.dtype)
    check_matrix(T, name=name, finite=check_finite)
    restore = Restore(out_dtype, T.dtype, from_numpy)
    return T.to(work), restore


def check_representable(S: torch.Tensor, out_dtype: torch.dtype, shape: tuple[int, ...], in_dtype: torch.dtype) -> None:
    """Raise ``ValueError`` when singular values of a finite input overflow the working or output dtype.

    ``S`` holds the singular values in the working dtype; ``out_dtype`` is the dtype they are
    returned in (a half type for half input). Without this check an overflow comes back as a
    silent ``inf``.
    """
    if not bool(torch.isfinite(S).all()):
        hint = "scale A down" if S.dtype == torch.float64 else "scale A down or pass float64"
        raise ValueError(
            f"A of shape {shape} ({in_dtype}) is finite but its singular values overflow {S.dtype} "
            f"(largest finite value {torch.finfo(S.dtype).max:.4g}); {hint}"
        )
    if out_dtype.is_floating_point and torch.finfo(out_dtype).max < torch.finfo(S.dtype).max:
        if not bool(torch.isfinite(S.to(out_dtype)).all()):
            largest = float(S.abs().max())
            limit = torch.finfo(out_dtype).max
            raise ValueError(
                f"A of shape {shape} ({in_dtype}): its largest singular value {largest:.4g} overflows "
                f"{out_dtype} (largest finite value {limit:.4g}); scale A down or pass float32"
            )
