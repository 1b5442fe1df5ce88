"""Input handling shared by the ``linalg`` functions.

Every public ``linalg`` function accepts a NumPy array or a torch tensor. NumPy input is
computed on the CPU and returned as NumPy; tensors keep their device. Half precision is
computed in float32 and the results are cast back to the input dtype.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

Array = Any  # a torch.Tensor or a numpy.ndarray

_HALF = (torch.float16, torch.bfloat16)


def to_tensor(A: Array) -> tuple[torch.Tensor, bool]:
    """Return ``A`` as a tensor and whether it came in as NumPy."""
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


def prepare(A: Array, *, name: str = "A", check_finite: bool = True) -> tuple[torch.Tensor, Callable[[torch.Tensor], Array]]:
    """Validate ``A`` and return it in its working dtype with a function that restores outputs.

    The restore function casts a result back to the caller's dtype and, for NumPy input,
    converts it to a NumPy array. With ``check_finite=False`` the caller takes over the NaN/Inf
    check (for example on a sketch ``A @ Omega``, which any non-finite entry poisons) and calls
    :func:`check_matrix` when it fails.
    """
    T, from_numpy = to_tensor(A)
    out_dtype = T.dtype if T.dtype.is_floating_point else torch.float64 if from_numpy else torch.float32
    work = working_dtype(T.dtype)
    check_matrix(T, name=name, finite=check_finite)
    T = T.to(work)

    def restore(X: torch.Tensor) -> Array:
        X = X.to(out_dtype)
        return X.numpy() if from_numpy else X

    return T, restore
