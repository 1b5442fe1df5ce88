"""The iterations behind :func:`svdkit.linalg.randomized_svd`: block Krylov and subspace bases, Rayleigh-Ritz.

Everything here sees the matrix ``X`` (..., r, c), r <= c, only through an operator with
``X.mm(B) = X @ B`` and ``X.rmm(B) = X^T @ B`` (see :mod:`svdkit.linalg._sparse`), so the same code
runs on dense tensors and on sparse matrices.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["gaussian", "krylov_basis", "rayleigh_ritz", "subspace_basis"]

# The fast Rayleigh-Ritz step picks the top-k subspace from a float32 Gram matrix; it is used only
# while the k-th Ritz value (squared) stays this far above the Gram's rounding floor.
_GRAM_RATIO_FLOOR = 1e-4

# An adaptive Krylov run starts with room for this many blocks (the usual stop) and grows once
# if it goes further.
_FIRST_CAPACITY = 3


def gaussian(shape, dtype, device, seed) -> torch.Tensor:
    if isinstance(seed, torch.Generator):
        generator = seed
    elif seed is None:
        generator = None
    else:
        generator = torch.Generator().manual_seed(int(seed))
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, dtype=dtype, device=gen_device).to(device)


def _qr_fast(Y: torch.Tensor, normalizer: str, *, first: bool) -> torch.Tensor | None:
    """Orthonormal basis of a block (..., r, l) by the fast route, or None where that is not safe.

    First round: Cholesky-QR with the Gram matrix formed in float64 (accurate up to a condition
    number of ~1e6), refused when the Cholesky factor shows a larger one. Second round, on a
    block that should already be nearly orthonormal, with ``E = Y^T Y - I``: for
    ``||E||_F <= 1e-3`` (the usual case) one Newton-Schulz step ``Y (3 I - Y^T Y) / 2`` leaves
    ``0.75 ||E||**2`` and costs one product (no factorisation, so no LAPACK call whose thread
    barriers stall on a busy machine); for ``||E||_F <= 1/2`` Cholesky-QR in the working dtype
    (every singular value of ``Y`` in [0.7, 1.2], so rounding along the earlier basis is not
    amplified); beyond that, None. ``normalizer="qr"`` uses Householder QR instead, with the same
    second-round check.
    """
    if normalizer == "qr":
        Q, R = torch.linalg.qr(Y)
        return Q if first or bool((_deviation(R.mT @ R) <= 0.5).all()) else None
    Yw = Y.double() if first else Y
    gram = Yw.mT @ Yw
    if not first:
        deviation = _deviation(gram)
        if bool((deviation <= 1e-3).all()):
            eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
            return Y @ ((3 * eye - gram) / 2)
        if not bool((deviation <= 0.5).all()):
            return None
    L, info = torch.linalg.cholesky_ex(gram)
    if bool((info != 0).any()):
        return None
    diag = L.diagonal(dim1=-2, dim2=-1)
    if not bool((diag > 1e-6 * diag.amax(dim=-1, keepdim=True)).all()):
        return None
    return torch.linalg.solve_triangular(L.mT, Yw, upper=True, left=False).to(Y.dtype)


def _deviation(gram: torch.Tensor) -> torch.Tensor:
    """``||gram - I||_F`` per matrix of the batch."""
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return torch.linalg.matrix_norm(gram - eye)


def _project(Y: torch.Tensor, Qb: torch.Tensor | None) -> torch.Tensor:
    return Y if Qb is None else Y - Qb @ (Qb.mT @ Y)


def _extend_basis(Y: torch.Tensor, Qb: torch.Tensor | None, normalizer: str, ref: torch.Tensor, step: int) -> torch.Tensor:
    """Orthonormal block (..., r, l) orthogonal to ``Qb`` whose span holds ``Y``'s part outside ``Qb``.

    ``Y`` has already been projected once against ``Qb``. Two rounds ("twice is enough") by the
    fast route when the block has full numerical rank; otherwise :func:`_extend_basis_robust`.
    """
    Q1 = _qr_fast(Y, normalizer, first=True)
    if Q1 is not None:
        Q2 = _qr_fast(_project(Q1, Qb), normalizer, first=False)
        if Q2 is not None:
            return Q2
    return _extend_basis_robust(Y, Qb, ref, step)


def _extend_basis_robust(Y: torch.Tensor, Qb: torch.Tensor | None, ref: torch.Tensor, step: int) -> torch.Tensor:
    """The rank-revealing route for (numerically) rank-deficient blocks.

    Directions of ``Y`` whose singular value is below ``sqrt(eps) * ref`` carry no reliable
    information (they are mostly rounding left by the projection) and cannot be made orthogonal to
    ``Qb``; they are replaced by Gaussian directions from a fixed stream, so the basis stays
    orthonormal and full (a zero or low-rank ``A`` still gets ``k`` orthonormal vectors).
    """
    Y = _project(Y, Qb)
    U, S, _ = torch.linalg.svd(Y, full_matrices=False)
    keep = S > torch.finfo(Y.dtype).eps ** 0.5 * ref.unsqueeze(-1)  # (..., l), descending S
    fill = gaussian(Y.shape, Y.dtype, Y.device, torch.Generator().manual_seed(0x5EED + step))
    B = torch.where(keep.unsqueeze(-2), U, fill)  # kept directions first, random ones after
    for _ in range(2):
        B = torch.linalg.qr(_project(B, Qb)).Q
    return B


def _normalize(Y: torch.Tensor, normalizer: str) -> torch.Tensor:
    """Re-scale a power-iteration block: LU (P L), QR, or nothing."""
    if normalizer in ("auto", "lu"):
        P, L, _ = torch.linalg.lu(Y)
        return P @ L
    if normalizer == "qr":
        return torch.linalg.qr(Y).Q
    return Y


def krylov_basis(X, Y: torch.Tensor, q: int, normalizer: str, settle: Callable[[torch.Tensor], bool] | None = None):
    """Block Lanczos with full re-orthogonalisation on ``X X^T``.

    Parameters
    ----------
    X : operator on a matrix of shape (..., r, c), r <= c
    Y : Tensor of shape (..., r, l)
        The sketch ``X w`` of a Gaussian ``w``.
    q : int
        Steps (the most, with ``settle``); the basis has ``b = (q + 1) * l`` columns and
        ``2 * (q + 1)`` passes are made.
    settle : callable, optional
        Adaptive stopping: called after each block ``i`` with the Gram matrix ``G_i = Z^T Z`` of
        the basis so far (..., (i + 1) l, (i + 1) l), of which only the upper triangle is filled
        (``G_{i-1}`` is exactly its leading block); True stops the iteration with that basis (also
        called at ``i = q``, to report).

    Returns
    -------
    Q : Tensor of shape (..., r, b)
        Orthonormal basis of ``[X w, (X X^T) X w, ..., (X X^T)^s X w]``, ``s`` the steps made.
    Z : Tensor of shape (..., c, b)
        ``X^T Q``.
    G : Tensor of shape (..., b, b)
        ``Z^T Z = Q^T X X^T Q``.
    steps : int
        ``s``: ``q``, or fewer when ``settle`` stopped the iteration.

    Notes
    -----
    Each new block ``Y = X Z_i`` is projected against all earlier blocks twice ("twice is
    enough"), normalised with a float64-Gram Cholesky-QR after the first projection and a
    float32 one after the second (by then the block is nearly orthonormal). The projection
    coefficients are exactly ``Q^T X X^T Q_i``, so the Gram matrix of the Rayleigh-Ritz step comes
    for free except for its last block column, which costs one ``c x b x l`` product instead of
    ``c x b x b``. With ``settle`` that column is formed after every block (its top-``k``
    eigenvalues are the squared Ritz values of the basis so far); it is the one the final step
    needs when the iteration stops there.
    """
    r, c = X.shape[-2:]
    l = Y.shape[-1]
    batch = X.shape[:-2]
    blocks = q + 1 if settle is None else min(q + 1, _FIRST_CAPACITY)
    Q = torch.empty(*batch, r, blocks * l, dtype=X.dtype, device=X.device)
    Z = torch.empty(*batch, c, blocks * l, dtype=X.dtype, device=X.device)
    G = torch.zeros(*batch, blocks * l, blocks * l, dtype=X.dtype, device=X.device)
    # The stopping rule reads its own Gram matrix, every block column from Z: the matrix at step
    # i - 1 is then exactly the leading block of the one at step i, so the gain between the two
    # (a difference of Ritz energies) carries no rounding of its own.
    Gc = torch.zeros_like(G) if settle is not None else None
    Q[..., :l] = _extend_basis(Y, None, normalizer, torch.linalg.matrix_norm(Y), 0)
    steps, last_column_done = q, False
    for i in range(q + 1):
        lo, hi = i * l, (i + 1) * l
        Zi = X.rmm(Q[..., lo:hi])
        Z[..., lo:hi] = Zi
        if Gc is not None:
            column = Z[..., :hi].mT @ Zi
            Gc[..., :hi, lo:hi] = column
            G[..., :hi, lo:hi] = column  # the final step's last column, if the iteration stops here
            if settle(Gc[..., :hi, :hi]) or i == q:
                steps, last_column_done = i, True
                break
        if i == q:
            break
        if hi + l > Q.shape[-1]:
            Q, Z, G, Gc = _grow(Q, Z, G, Gc, (q + 1) * l)
        Y = X.mm(Zi)
        Qb = Q[..., :hi]
        C = Qb.mT @ Y  # = Q_{<=i}^T X X^T Q_i: the upper part of G's block column i
        G[..., :hi, lo:hi] = C
        Q[..., hi : hi + l] = _extend_basis(Y - Qb @ C, Qb, normalizer, torch.linalg.matrix_norm(Y), i + 1)
    b = (steps + 1) * l
    Q, Z, G = Q[..., :b], Z[..., :b], G[..., :b, :b]
    if not last_column_done:
        G[..., :, steps * l :] = Z.mT @ Z[..., steps * l :]
    # The computed blocks lie on and above the block diagonal; mirror them below.
    upper = torch.ones(steps + 1, steps + 1, dtype=torch.bool, device=X.device).triu()
    upper = upper.repeat_interleave(l, 0).repeat_interleave(l, 1)
    G = torch.where(upper, G, G.mT)
    return Q, Z, (G + G.mT) / 2, steps


def _grow(Q: torch.Tensor, Z: torch.Tensor, G: torch.Tensor, Gc: torch.Tensor, b: int):
    """The basis buffers with room for ``b`` columns, contents kept."""
    n = Q.shape[-1]
    Qn = Q.new_empty(*Q.shape[:-1], b)
    Zn = Z.new_empty(*Z.shape[:-1], b)
    Gn = G.new_zeros(*G.shape[:-2], b, b)
    Gcn = Gc.new_zeros(*Gc.shape[:-2], b, b)
    Qn[..., :n], Zn[..., :n], Gn[..., :n, :n], Gcn[..., :n, :n] = Q, Z, G, Gc
    return Qn, Zn, Gn, Gcn


def subspace_basis(X, Y: torch.Tensor, q: int, normalizer: str):
    """HMT subspace iteration from the sketch ``Y = X w``: ``Q = orth((X X^T)^q Y)``, ``Z = X^T Q``."""
    for _ in range(q):
        Z = X.rmm(_normalize(Y, normalizer))
        Y = X.mm(_normalize(Z, normalizer))
    Q = torch.linalg.qr(Y).Q
    return Q, X.rmm(Q)


def rayleigh_ritz(Q: torch.Tensor, Z: torch.Tensor, G: torch.Tensor, k: int):
    """Top-``k`` SVD of ``B = Q^T X = Z^T`` (..., b, c), lifted back: ``U = Q U_B``, ``V = V_B``.

    ``G = Z^T Z = B B^T`` (..., b, b), accurate to float32 rounding.

    For float32 the eigenvectors ``W`` of ``G`` select the top-``k`` Ritz subspace, and a second,
    ``k x k`` Rayleigh-Ritz step on the Gram matrix of ``Z W`` formed in float64 gives the final
    values and vectors: ``V`` is then orthonormal to float32 rounding whatever the ratio
    ``s_1 / s_k`` (a plain Gram-matrix step loses ``eps * (s_1 / s_k)**2``). In every case
    ``U diag(S) V^T = Q P Q^T X`` for an orthogonal projector ``P``.
    """
    if Z.dtype == torch.float32:
        lam, W = torch.linalg.eigh(G)
        lam, W = lam[..., -k:].flip(-1), W[..., -k:].flip(-1)
        if bool((lam[..., -1] > _GRAM_RATIO_FLOOR * lam[..., 0]).all()):
            ZW = Z @ W
            ZWd = ZW.double()
            mu, Wh = torch.linalg.eigh(ZWd.mT @ ZWd)
            mu, Wh = mu.flip(-1), Wh.flip(-1)
            S = mu.clamp_min(0).sqrt()
            U = Q @ (W.double() @ Wh).to(Z.dtype)
            V = ZW @ (Wh / S.unsqueeze(-2)).to(Z.dtype)
            return U, S.to(Z.dtype), V
    # Stable route (float64 input, or Ritz values near the Gram's rounding floor): Z = Qz Rz,
    # then B = Rz^T Qz^T and the SVD of the small Rz^T gives both sides without squaring.
    Qz, Rz = torch.linalg.qr(Z)
    Ur, S, Vrh = torch.linalg.svd(Rz.mT)
    return Q @ Ur[..., :k], S[..., :k], Qz @ Vrh.mT[..., :k]
