"""A matrix seen only through its products ``X @ B`` and ``X^T @ B``: dense tensors and sparse matrices.

:func:`svdkit.linalg.randomized_svd` touches its input in nothing but block products, so a sparse
matrix (``scipy.sparse``, or a torch COO/CSR/CSC tensor) is used as it is: never densified, and
copied only where it must be: a cast of its stored values to the working dtype, a torch COO
tensor coalesced, a scipy matrix converted to canonical CSR (sorted indices, no duplicate
entries). Dense blocks ``B`` are torch tensors throughout.
"""

from __future__ import annotations

from typing import Any, Union

import numpy as np
import torch

from ._tensor import Restore, sparse_description, working_dtype

__all__ = ["DenseOperator", "ScipySparseOperator", "TorchSparseOperator", "check_sparse_finite", "sparse_operator", "sum_squares"]

_TORCH_LAYOUTS = (torch.sparse_coo, torch.sparse_csr, torch.sparse_csc)


def sum_squares(T: torch.Tensor, dim: tuple[int, ...]) -> torch.Tensor:
    """``sum(T**2)`` in float64 over ``dim``: ``(-2, -1)`` (a batch of matrices) or ``(0,)`` (a vector).

    Chunks of about 65 k entries are squared and summed in the working dtype (torch's cascaded
    summation, then one rounding per chunk), their sums added in float64: about 1e-7 relative
    or better in float32, in one read of ``T`` and without a copy of it.
    (A float32 norm of millions of entries at once loses digits, 0.4 % on 33 M Gaussian entries;
    casting ``T`` to float64 doubles its memory.) A chunk whose squares overflow is summed in
    float64.
    """
    if dim == (0,):
        total = torch.zeros((), dtype=torch.float64, device=T.device)
        for piece in T.split(_CHUNK):
            total += _chunk_sum(piece, (0,))
        return total
    if dim != (-2, -1):
        raise ValueError(f"sum_squares sums over (-2, -1) or (0,), got {dim}")
    total = torch.zeros(T.shape[:-2], dtype=torch.float64, device=T.device)
    for piece in T.split(max(1, _CHUNK // max(1, T.shape[-1])), dim=-2):
        total += _chunk_sum(piece, dim)
    return total


_CHUNK = 1 << 16


def _chunk_sum(piece: torch.Tensor, dim: tuple[int, ...]) -> torch.Tensor:
    total = (piece * piece).sum(dim=dim).double()
    if not bool(torch.isfinite(total).all()):
        total = piece.double().square().sum(dim=dim)
    return total


class DenseOperator:
    """Products with a dense tensor ``X`` of shape (..., r, c).

    Exactly ``X @ B`` and ``X.mT @ B``, so the results are those of the plain expressions.
    """

    def __init__(self, X: torch.Tensor) -> None:
        self.X = X
        self.shape = X.shape
        self.dtype = X.dtype
        self.device = X.device

    def mm(self, B: torch.Tensor) -> torch.Tensor:
        """``X @ B``: (..., c, l) -> (..., r, l)."""
        return self.X @ B

    def rmm(self, B: torch.Tensor) -> torch.Tensor:
        """``X^T @ B``: (..., r, l) -> (..., c, l)."""
        return self.X.mT @ B

    def frobenius_sq(self) -> torch.Tensor:
        """``||X||_F**2`` per matrix of the batch, float64 of shape (...)."""
        X = self.X
        if not X.is_contiguous() and X.mT.is_contiguous():  # a transposed view: read it in memory order
            X = X.mT
        return sum_squares(X, dim=(-2, -1))


class TorchSparseOperator:
    """Products with a 2-D torch sparse tensor (COO, CSR or CSC), optionally transposed."""

    def __init__(self, A: torch.Tensor, transposed: bool) -> None:
        self.A = A
        self.X = A.mT if transposed else A
        self.Xt = A if transposed else A.mT
        self.shape = self.X.shape
        self.dtype = A.dtype
        self.device = A.device

    def mm(self, B: torch.Tensor) -> torch.Tensor:
        return self.X @ B

    def rmm(self, B: torch.Tensor) -> torch.Tensor:
        return self.Xt @ B

    def values(self) -> torch.Tensor:
        return self.A.values()

    def frobenius_sq(self) -> torch.Tensor:
        return sum_squares(self.values(), dim=(0,))


class ScipySparseOperator:
    """Products with a canonical ``scipy.sparse`` CSR matrix, optionally transposed (then a CSC view)."""

    def __init__(self, A: Any, transposed: bool) -> None:
        self.A = A
        self.X = A.T if transposed else A
        self.shape = torch.Size(self.X.shape)
        self.dtype = torch.float32 if A.dtype == np.float32 else torch.float64
        self.device = torch.device("cpu")

    def _product(self, M: Any, B: torch.Tensor) -> torch.Tensor:
        out = M @ B.detach().cpu().numpy()
        return torch.from_numpy(np.ascontiguousarray(out, dtype=self.A.dtype))

    def mm(self, B: torch.Tensor) -> torch.Tensor:
        return self._product(self.X, B)

    def rmm(self, B: torch.Tensor) -> torch.Tensor:
        return self._product(self.X.T, B)

    def values(self) -> torch.Tensor:
        return torch.from_numpy(self.A.data)

    def frobenius_sq(self) -> torch.Tensor:
        return sum_squares(self.values(), dim=(0,))


SparseOperator = Union[TorchSparseOperator, ScipySparseOperator]


def check_sparse_finite(op: SparseOperator, shape: tuple[int, ...]) -> None:
    """Raise ``ValueError`` counting the NaN and Inf among the stored entries, if any."""
    values = op.values()
    n_nan = int(torch.isnan(values).sum())
    n_inf = int(torch.isinf(values).sum())
    if n_nan or n_inf:
        raise ValueError(f"A of shape {shape} has non-finite entries: {n_nan} NaN and {n_inf} Inf (stored entries)")


def sparse_operator(A: Any) -> tuple[SparseOperator, Restore, tuple[int, int]] | None:
    """Wrap sparse ``A`` for products on its short side; None for dense input.

    Returns
    -------
    op : operator on ``X`` of shape (r, c), r <= c: ``A``, or ``A^T`` when ``A`` is tall
    restore : casts results to ``A``'s dtype (NumPy arrays for scipy input, tensors otherwise)
    shape : (m, n), the shape of ``A``

    Raises
    ------
    TypeError
        For complex values or a torch sparse layout other than COO, CSR and CSC.
    ValueError
        For anything but a single non-empty matrix (2-D, no dense dimensions).
    """
    what = sparse_description(A)
    if what is None:
        return None
    shape = tuple(int(d) for d in A.shape)
    if len(shape) != 2 or (isinstance(A, torch.Tensor) and A.dense_dim() != 0):
        raise ValueError(
            f"sparse input must be a single 2-D matrix, got {what} of shape {tuple(A.shape)}; "
            f"for a batch, call randomized_svd once per matrix"
        )
    if 0 in shape:
        raise ValueError(f"A is empty (shape {shape}); a decomposition needs m, n >= 1")
    transposed = shape[0] > shape[1]
    if isinstance(A, torch.Tensor):
        if A.layout not in _TORCH_LAYOUTS:
            raise TypeError(f"randomized_svd takes torch COO, CSR and CSC sparse tensors, got {what}; convert it with .to_sparse_csr()")
        out_dtype = A.dtype if A.dtype.is_floating_point else torch.float32
        T = A.to(working_dtype(A.dtype))
        if T.layout == torch.sparse_coo:
            T = T.coalesce()
        return TorchSparseOperator(T, transposed), Restore(out_dtype, A.dtype, False), shape
    kind = np.dtype(A.dtype).kind
    if kind == "c":
        raise TypeError(f"complex input ({A.dtype}) is not supported; svdkit works on real matrices")
    if kind not in "biuf":
        raise TypeError(f"expected a sparse matrix of numbers, got {what} of dtype {A.dtype}")
    # As for NumPy arrays: float16/float32 work in float32 and come back in their dtype; other
    # floats and integers work in float64 and come back as float64.
    single = kind == "f" and np.dtype(A.dtype).itemsize <= 4
    work = np.float32 if single else np.float64
    in_dtype = _TORCH_FROM_NUMPY.get(np.dtype(A.dtype).name, torch.float64)
    out_dtype = in_dtype if single else torch.float64
    M = A.tocsr()
    if M.dtype != work:
        M = M.astype(work)
    if not M.has_canonical_format:
        M = M.copy() if M is A else M  # never modify the caller's matrix
        M.sum_duplicates()
    return ScipySparseOperator(M, transposed), Restore(out_dtype, in_dtype, True), shape


_TORCH_FROM_NUMPY = {"float16": torch.float16, "float32": torch.float32, "float64": torch.float64, "int32": torch.int32, "int64": torch.int64}
