"""Randomized truncated SVD: block Krylov and subspace (power) iteration.

The default method is a randomized block Krylov iteration (Halko, Martinsson & Tropp 2011,
arXiv:0909.4061, Sec. 4.5; Musco & Musco 2015, arXiv:1504.05477). It makes the same passes over
``A`` as the classic HMT range finder with ``n_iter`` power steps, ``2 * (n_iter + 1)``, but keeps
every block of the iteration, so the subspace the final Rayleigh-Ritz step sees is
``(n_iter + 1)`` times wider for free: each block ``Q_i`` comes with ``Z_i = A^T Q_i`` from the
next half-step, and ``Q^T A`` is just the transpose of ``[Z_0 ... Z_q]``. On slowly decaying
spectra (trained weights) two Krylov steps reach the Frobenius accuracy that plain subspace
iteration needs four or more for.
"""

from __future__ import annotations

from typing import Literal

import torch

from ._tensor import Array, prepare
from .svd import SVDResult, svd, svd_flip

__all__ = ["randomized_svd"]

Method = Literal["krylov", "subspace"]
Normalizer = Literal["auto", "cholqr", "qr", "lu", "none"]

_NORMALIZERS = {"krylov": ("auto", "cholqr", "qr"), "subspace": ("auto", "lu", "qr", "none")}

# The fast Rayleigh-Ritz step eigendecomposes a float32 Gram matrix; it is used only while the
# k-th Ritz value stays this far above the Gram's rounding floor.
_GRAM_RATIO_FLOOR = 1e-4


def randomized_svd(
    A: Array,
    k: int,
    *,
    oversamples: int = 10,
    n_iter: int | Literal["auto"] = "auto",
    normalizer: Normalizer = "auto",
    method: Method = "krylov",
    seed: int | torch.Generator | None = None,
) -> SVDResult:
    """Approximate the top-``k`` singular triplets of ``A`` with a randomized range finder.

    Parameters
    ----------
    A : Tensor or ndarray of shape (..., m, n)
        Real input; float16/bfloat16 run in float32. CUDA tensors stay on CUDA.
    k : int
        Number of singular triplets, ``1 <= k <= min(m, n)``.
    oversamples : int
        Extra sketch columns ``p``; the block width is ``l = k + p``.
    n_iter : int or "auto"
        Power (Krylov) steps ``q``; the method makes ``2 * (q + 1)`` passes over ``A``.
        ``"auto"`` is 2 for ``"krylov"`` and scikit-learn's rule for ``"subspace"`` (7 when
        ``k < 0.1 * min(m, n)``, else 4).
    normalizer : {"auto", "cholqr", "qr", "lu", "none"}
        How blocks are re-normalised between passes. ``"krylov"`` needs orthonormal blocks:
        ``"cholqr"`` (Cholesky-QR in float64, Householder QR if it breaks down; the ``"auto"``
        choice) or ``"qr"``. ``"subspace"`` accepts ``"lu"`` (the ``"auto"`` choice, as in
        scikit-learn), ``"qr"`` or ``"none"``.
    method : {"krylov", "subspace"}
        Block Krylov iteration (default) or classic subspace iteration (HMT Alg. 4.4).
    seed : int, torch.Generator or None
        The Gaussian test matrix is drawn on the CPU from this seed (None: torch's global
        generator) and moved to ``A``'s device, so a seed gives the same sketch everywhere.

    Returns
    -------
    SVDResult
        ``U`` (..., m, k), ``S`` (..., k) descending, ``Vh`` (..., k, n), sign-fixed like
        :func:`svdkit.linalg.svd`.

    Notes
    -----
    The work happens on the smaller side of ``A`` (a tall input is transposed). When the
    subspace would be as large as the matrix (``2 l > min(m, n)`` for Krylov, ``l >= min(m, n)``
    for subspace iteration) the exact SVD is computed and truncated instead. The Krylov basis
    is capped at ``min(m, n)`` columns by lowering ``q`` when needed.
    """
    T, restore = prepare(A)
    m, n = T.shape[-2:]
    r = min(m, n)
    _validate(k, oversamples, n_iter, normalizer, method, T.shape)
    width = min(k + oversamples, r)
    q = _resolve_n_iter(n_iter, method, k, r)
    if method == "krylov" and (q + 1) * width > r:
        q = r // width - 1
    if width >= r or q < 0 or (method == "krylov" and q == 0 and n_iter != 0):
        U, S, Vh = svd(T)
        return SVDResult(restore(U[..., :k]), restore(S[..., :k]), restore(Vh[..., :k, :]))

    transposed = m > n
    X = T.mT if transposed else T  # (..., r, c) with r <= c: the basis lives on the short side
    omega = _gaussian((*X.shape[:-2], X.shape[-1], width), X.dtype, X.device, seed)
    if method == "krylov":
        Q, Z = _krylov_basis(X, omega, q, normalizer)
    else:
        Q, Z = _subspace_basis(X, omega, q, normalizer)
    U, S, V = _rayleigh_ritz(Q, Z, k)
    if transposed:
        U, V = V, U
    U, Vh = svd_flip(U, V.mT)
    return SVDResult(restore(U), restore(S), restore(Vh))


def _validate(k, oversamples, n_iter, normalizer, method, shape) -> None:
    r = min(shape[-2:])
    if method not in _NORMALIZERS:
        raise ValueError(f"method must be 'krylov' or 'subspace', got {method!r}")
    if normalizer not in _NORMALIZERS[method]:
        raise ValueError(
            f"normalizer {normalizer!r} does not apply to method {method!r}; "
            f"choose one of {_NORMALIZERS[method]}"
        )
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= r:
        raise ValueError(f"k must be an int in [1, min(m, n)] = [1, {r}] for shape {tuple(shape)}, got {k!r}")
    if isinstance(oversamples, bool) or not isinstance(oversamples, int) or oversamples < 0:
        raise ValueError(f"oversamples must be a non-negative int, got {oversamples!r}")
    if n_iter != "auto" and (isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 0):
        raise ValueError(f"n_iter must be 'auto' or a non-negative int, got {n_iter!r}")


def _resolve_n_iter(n_iter, method: str, k: int, r: int) -> int:
    if n_iter != "auto":
        return n_iter
    if method == "krylov":
        return 2
    return 7 if k < 0.1 * r else 4


def _gaussian(shape, dtype, device, seed) -> torch.Tensor:
    if isinstance(seed, torch.Generator):
        generator = seed
    elif seed is None:
        generator = None
    else:
        generator = torch.Generator().manual_seed(int(seed))
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, dtype=dtype, device=gen_device).to(device)


def _orthonormalize(Y: torch.Tensor, normalizer: str) -> torch.Tensor:
    """Orthonormal basis of the columns of ``Y`` (..., r, l)."""
    if normalizer in ("auto", "cholqr"):
        Yd = Y.double()
        L, info = torch.linalg.cholesky_ex(Yd.mT @ Yd)
        if not bool((info != 0).any()):
            Q = torch.linalg.solve_triangular(L, Yd.mT, upper=False).mT
            return Q.to(Y.dtype)
    return torch.linalg.qr(Y).Q


def _normalize(Y: torch.Tensor, normalizer: str) -> torch.Tensor:
    """Re-scale a power-iteration block: LU (P L), QR, or nothing."""
    if normalizer in ("auto", "lu"):
        P, L, _ = torch.linalg.lu(Y)
        return P @ L
    if normalizer == "qr":
        return torch.linalg.qr(Y).Q
    return Y


def _project_out(Y: torch.Tensor, basis: torch.Tensor | None, normalizer: str) -> torch.Tensor:
    """Orthonormalize ``Y`` against ``basis`` and itself (two rounds: 'twice is enough')."""
    if basis is None:
        return _orthonormalize(_orthonormalize(Y, normalizer), normalizer)
    for _ in range(2):
        Y = Y - basis @ (basis.mT @ Y)
        Y = _orthonormalize(Y, normalizer)
    return Y


def _krylov_basis(X, omega, q, normalizer):
    """Blocks ``Q = [Q_0..Q_q]`` spanning ``[X w, (X X^T) X w, ...]`` and ``Z = X^T Q``."""
    Qs: list[torch.Tensor] = []
    Zs: list[torch.Tensor] = []
    Y = X @ omega
    for step in range(q + 1):
        basis = torch.cat(Qs, dim=-1) if Qs else None
        Q = _project_out(Y, basis, normalizer)
        Z = X.mT @ Q
        Qs.append(Q)
        Zs.append(Z)
        if step < q:
            Y = X @ Z
    return torch.cat(Qs, dim=-1), torch.cat(Zs, dim=-1)


def _subspace_basis(X, omega, q, normalizer):
    """HMT subspace iteration: ``Q = orth((X X^T)^q X w)`` and ``Z = X^T Q``."""
    Y = X @ omega
    for _ in range(q):
        Z = X.mT @ _normalize(Y, normalizer)
        Y = X @ _normalize(Z, normalizer)
    Q = torch.linalg.qr(Y).Q
    return Q, X.mT @ Q


def _rayleigh_ritz(Q: torch.Tensor, Z: torch.Tensor, k: int):
    """Top-``k`` SVD of ``B = Q^T X = Z^T`` (..., b, c), lifted back: ``U = Q U_B``, ``V = V_B``."""
    if Z.dtype == torch.float32:
        lam, W = torch.linalg.eigh((Z.mT @ Z).double())
        lam, W = lam.flip(-1)[..., :k], W.flip(-1)[..., :k]
        if bool((lam[..., -1] > _GRAM_RATIO_FLOOR * lam[..., 0]).all()):
            S = lam.sqrt()
            W = W.to(Z.dtype)
            return Q @ W, S.to(Z.dtype), (Z @ W) / S.to(Z.dtype).unsqueeze(-2)
    # Stable route (float64 input, or Ritz values near the Gram's rounding floor): Z = Qz Rz,
    # then B = Rz^T Qz^T and the SVD of the small Rz^T gives both sides without squaring.
    Qz, Rz = torch.linalg.qr(Z)
    Ur, S, Vrh = torch.linalg.svd(Rz.mT)
    return Q @ Ur[..., :k], S[..., :k], Qz @ Vrh.mT[..., :k]
