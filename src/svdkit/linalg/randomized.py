"""Randomized truncated SVD: block Krylov and subspace (power) iteration, dense or sparse input.

The default method is a randomized block Krylov iteration (Halko, Martinsson & Tropp 2011,
arXiv:0909.4061, Sec. 4.5; Musco & Musco 2015, arXiv:1504.05477). It makes the same passes over
``A`` as the classic HMT range finder with ``n_iter`` power steps, ``2 * (n_iter + 1)``, but keeps
every block of the iteration, so the subspace the final Rayleigh-Ritz step sees is
``(n_iter + 1)`` times wider for free: each block ``Q_i`` comes with ``Z_i = A^T Q_i`` from the
next half-step, and ``Q^T A`` is just the transpose of ``[Z_0 ... Z_q]``. On slowly decaying
spectra (trained weights) two Krylov steps reach the Frobenius accuracy that plain subspace
iteration needs four or more for.

Cost beyond the passes: the blocks are orthogonalised against each other (block Gram-Schmidt,
twice, with Cholesky-QR inside), the Gram matrix ``Z^T Z`` of the Rayleigh-Ritz step is read off
the projection coefficients, and a ``b x b`` then a ``k x k`` symmetric eigenproblem finish the
job (``b = (n_iter + 1) * (k + oversamples)``). Blocks that lose rank (an exactly low-rank ``A``,
a zero matrix) take a rank-revealing route that keeps the basis orthonormal.

The iterations live in :mod:`svdkit.linalg._krylov`; they see ``A`` only through products, which
is what lets sparse matrices in (:mod:`svdkit.linalg._sparse`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, overload

import numpy as np
import torch

from ._krylov import gaussian, krylov_basis, rayleigh_ritz, subspace_basis
from ._sparse import DenseOperator, check_sparse_finite, sparse_operator
from ._tensor import Array, check_matrix, check_representable, prepare
from .svd import SVDResult, svd, svd_flip

__all__ = ["AUTO_MAX_N_ITER", "AUTO_TOL", "RandomizedSVDInfo", "check_seed", "layer_seed", "randomized_svd"]

Iteration = Literal["krylov", "subspace"]
Normalizer = Literal["auto", "cholqr", "qr", "lu", "none"]

_NORMALIZERS = {"krylov": ("auto", "cholqr", "qr"), "subspace": ("auto", "lu", "qr", "none")}

#: ``n_iter="auto"`` (block Krylov): the iteration stops once the estimated further gain in
#: captured energy ``sum(theta**2)`` of the top-k Ritz values is at most this fraction of the
#: residual ``||A||_F**2 - sum(theta**2)``, i.e. the squared Frobenius error is estimated to be
#: within 0.3 % (the error within 0.15 %) of where more steps would take it.
AUTO_TOL = 3e-3
#: ``n_iter="auto"`` (block Krylov) makes at most this many steps, ``2 * (6 + 1) = 14`` passes.
AUTO_MAX_N_ITER = 6
# A residual energy below this many units of rounding (of the working dtype) of ||A||_F**2 is
# not resolved; gains below this many float64 units are zero.
_AUTO_RESIDUAL_ULPS = 8
_AUTO_GAIN_ULPS = 64


@dataclass(frozen=True)
class RandomizedSVDInfo:
    """How a :func:`randomized_svd` call went (``return_info=True``).

    Attributes
    ----------
    method : {"krylov", "subspace", "exact"}
        ``"exact"`` when the sketch would be as large as the matrix and the exact SVD was taken
        (for sparse input: a Rayleigh-Ritz step on the whole short side, by products).
    n_iter : int
        Power (Krylov) steps made.
    passes : int
        Products of ``A`` or ``A^T`` with a block: ``2 * (n_iter + 1)``; 0 for the exact SVD of
        a dense input, 1 for the exact route of a sparse one.
    block_width : int
        Columns per block, ``l = min(k + oversamples, min(m, n))``.
    converged : bool or None
        For ``n_iter="auto"`` with the Krylov method: whether the Ritz values settled to
        :data:`AUTO_TOL` within the step limit. None otherwise.
    relative_gains : tuple of float
        For ``n_iter="auto"`` with the Krylov method: per step ``i >= 1``, how much that step
        raised the captured energy ``sum(theta**2)``, over the residual energy (the largest over
        a batch). Empty otherwise.
    """

    method: str
    n_iter: int
    passes: int
    block_width: int
    converged: bool | None = None
    relative_gains: tuple[float, ...] = ()


@overload
def randomized_svd(
    A: Array, k: int, *, oversamples: int = ..., n_iter: int | Literal["auto"] = ..., normalizer: Normalizer = ...,
    method: Iteration = ..., seed: int | torch.Generator | None = ..., return_info: Literal[False] = ...,
) -> SVDResult: ...
@overload
def randomized_svd(
    A: Array, k: int, *, oversamples: int = ..., n_iter: int | Literal["auto"] = ..., normalizer: Normalizer = ...,
    method: Iteration = ..., seed: int | torch.Generator | None = ..., return_info: Literal[True],
) -> tuple[SVDResult, RandomizedSVDInfo]: ...


def randomized_svd(
    A: Array,
    k: int,
    *,
    oversamples: int = 10,
    n_iter: int | Literal["auto"] = "auto",
    normalizer: Normalizer = "auto",
    method: Iteration = "krylov",
    seed: int | torch.Generator | None = None,
    return_info: bool = False,
) -> SVDResult | tuple[SVDResult, RandomizedSVDInfo]:
    """Approximate the top-``k`` singular triplets of ``A`` with a randomized range finder.

    Parameters
    ----------
    A : Tensor, ndarray or sparse matrix of shape (..., m, n)
        Real input; float16/bfloat16 run in float32. CUDA tensors stay on CUDA. Sparse input — a
        ``scipy.sparse`` matrix or array, or a torch ``sparse_coo`` / ``sparse_csr`` /
        ``sparse_csc`` tensor, one matrix of shape (m, n) — is used only through products with
        ``A`` and ``A^T`` and never densified (see Notes).
    k : int
        Number of singular triplets, ``1 <= k <= min(m, n)``.
    oversamples : int
        Extra sketch columns ``p``; the block width is ``l = k + p``.
    n_iter : int or "auto"
        Power (Krylov) steps ``q``; the method makes ``2 * (q + 1)`` passes over ``A``.
        ``"auto"`` adapts for ``"krylov"``: steps are added until the top-``k`` Ritz values have
        settled (tolerance :data:`AUTO_TOL` = 3e-3, at most :data:`AUTO_MAX_N_ITER` = 6 steps;
        see Notes). For ``"subspace"`` it is scikit-learn's rule (7 when ``k < 0.1 * min(m, n)``,
        else 4). An int is used as given.
    normalizer : {"auto", "cholqr", "qr", "lu", "none"}
        How blocks are re-normalised between passes. ``"krylov"`` needs orthonormal blocks:
        ``"cholqr"`` (Cholesky-QR, the Gram matrix in float64 on the first of two rounds; the
        ``"auto"`` choice) or ``"qr"`` (Householder); either falls back to an SVD of the block
        when it has lost rank. ``"subspace"`` accepts ``"lu"`` (the ``"auto"`` choice, as in
        scikit-learn), ``"qr"`` or ``"none"`` (unstable beyond a few steps).
    method : {"krylov", "subspace"}
        Block Krylov iteration (default) or classic subspace iteration (HMT Alg. 4.4).
    seed : int, torch.Generator or None
        The Gaussian test matrix is drawn on the CPU from this seed (None: torch's global
        generator) and moved to ``A``'s device, so a seed gives the same sketch everywhere.
        An int must fit in 64 bits; floats, strings and bools are refused.
    return_info : bool
        Also return a :class:`RandomizedSVDInfo` (steps and passes made, convergence).

    Returns
    -------
    SVDResult
        ``U`` (..., m, k), ``S`` (..., k) descending, ``Vh`` (..., k, n), sign-fixed like
        :func:`svdkit.linalg.svd`. NumPy in (dense or ``scipy.sparse``), NumPy out.
    RandomizedSVDInfo
        Only with ``return_info=True``.

    Raises
    ------
    ValueError
        For a bad argument (naming it and the shape), an empty input, NaN/Inf entries (counted;
        the check runs on the first sketch ``A @ Omega``, which saves a pass over ``A``), a
        finite input whose sketch or singular values overflow the dtype, or a batch of sparse
        matrices.
    TypeError
        For a seed that is not an int, a ``torch.Generator`` or None, complex input, or a torch
        sparse layout other than COO, CSR and CSC.

    Notes
    -----
    The work happens on the smaller side of ``A`` (a tall input is transposed). When the
    subspace would be as large as the matrix (``2 l > min(m, n)`` for Krylov, ``l >= min(m, n)``
    for subspace iteration) the exact SVD is computed and truncated instead. The Krylov basis
    is capped at ``min(m, n)`` columns by lowering ``q`` when needed.

    The result is a Rayleigh-Ritz projection, ``U diag(S) Vh = U U^T A``, so
    ``||A - U diag(S) Vh||_F**2 = ||A||_F**2 - sum(S**2)`` and every ``S[i]`` is at most the
    true ``s_i``. ``U`` and ``Vh`` are orthonormal to working precision, also when ``k``
    exceeds the rank of ``A``.

    **Adaptive steps** (``n_iter="auto"``, Krylov). After each block the top-``k`` Ritz values
    ``theta`` of the basis so far are read off its Gram matrix (a ``b x b`` symmetric eigenvalue
    problem in float64; no extra pass over ``A``). With the captured energy
    ``E_i = sum(theta**2)`` after step ``i``, the gain ``g_i = E_i - E_{i-1}``, its ratio
    ``rho = g_i / g_{i-1}`` and the residual ``R_i = ||A||_F**2 - E_i`` (the squared Frobenius
    error of the result), the iteration stops at the first ``i >= 1`` with
    ``rho g_i / (1 - rho) <= AUTO_TOL R_i``: the remaining gain, extrapolated geometrically, is at
    most 0.3 % of the squared error, so the error is within about 0.15 % of where further steps
    would take it. At ``i = 1``, with no ratio yet, the test is ``g_1 <= AUTO_TOL R_1``. It stops
    at the latest after ``AUTO_MAX_N_ITER`` steps, or when no further block fits in
    ``min(m, n)`` (then ``converged`` is False); a batch stops when all its matrices have
    settled. Rounding: ``R_i`` is a difference, taken as at least ``8 eps ||A||_F**2`` (``eps`` of
    the working dtype: in float32 an error below about ``1e-3 ||A||_F`` counts as that), and
    gains below ``64 eps_64 ||A||_F**2`` as zero. On spectra decaying like ``i**-0.7`` (trained
    weights) the rule stops after 2 steps (6 passes, as the fixed default did before) within
    0.12 % of the optimal error; a matrix of rank below ``l`` stops after 1 step (4 passes);
    flat (Gaussian) spectra take 2-4, more for larger ``k``. Beyond the passes it costs one read
    of ``A`` (for ``||A||_F``), a ``c x b x l`` product and a float64 ``b x b`` eigenvalue problem
    per step. The rule controls the Frobenius error: on flat spectra individual singular values
    settle more slowly, and a larger fixed ``n_iter`` resolves them better.

    **Sparse input.** The sketch, the iteration and the Rayleigh-Ritz step only multiply ``A``
    and ``A^T`` by dense blocks of ``l`` columns (scipy's own CSR/CSC products for
    ``scipy.sparse``, torch's for torch sparse tensors, on their device), so the memory is that
    of the blocks, ``O((m + n) (n_iter + 1) l)``, plus the matrix itself (scipy input is used as
    canonical CSR, converted or copied only if it is not; values are cast to the working dtype
    only if needed). Where a dense input would take the exact SVD, a sparse one takes a
    Rayleigh-Ritz step on the whole short side (one product with the identity, no larger than
    the sketch would be). NaN/Inf are counted among the stored entries. :func:`svd`,
    :func:`svdvals` and the other ``linalg`` functions need dense input and raise ``TypeError``
    for sparse matrices.
    """
    check_seed(seed)
    wrapped = sparse_operator(A)
    if wrapped is not None:
        op, restore, shape = wrapped
        dense = None
    else:
        # The NaN/Inf check is deferred to the first sketch, which any non-finite entry of A
        # poisons: that saves a full pass over A.
        dense, restore = prepare(A, check_finite=False, caller="randomized_svd")
        shape = tuple(dense.shape)
        op = DenseOperator(dense.mT if shape[-2] > shape[-1] else dense)  # (..., r, c), r <= c
    _validate(k, oversamples, n_iter, normalizer, method, shape)
    k = int(k)
    width, q, exact = _plan(shape, k, oversamples, n_iter, method)
    transposed = shape[-2] > shape[-1]  # the operator works on A^T

    def finish(U, S, Vh, info):
        check_representable(S, restore.dtype, shape, restore.input_dtype)
        result = SVDResult(restore(U), restore(S), restore(Vh))
        return (result, info) if return_info else result

    if exact and dense is not None:
        U, S, Vh = svd(dense)
        return finish(U[..., :k], S[..., :k], Vh[..., :k, :], RandomizedSVDInfo("exact", 0, 0, width))
    if exact:
        # The basis is the whole short side: Q = I, Z = X^T (one product, no larger than a sketch).
        r = op.shape[-2]
        Q = torch.eye(r, dtype=op.dtype, device=op.device)
        Z = op.rmm(Q)
        _check_sketch(Z, op, dense, shape)
        U, S, V = rayleigh_ritz(Q, Z, Z.mT @ Z, k)
        info = RandomizedSVDInfo("exact", 0, 1, width)
    else:
        omega = gaussian((*op.shape[:-2], op.shape[-1], width), op.dtype, op.device, seed)
        Y = op.mm(omega)
        _check_sketch(Y, op, dense, shape)
        if method == "krylov":
            rule = _SettleRule(op.frobenius_sq(), k, op.dtype) if n_iter == "auto" else None
            Q, Z, G, q = krylov_basis(op, Y, q, normalizer, rule)
            info = RandomizedSVDInfo(
                "krylov", q, 2 * (q + 1), width,
                converged=None if rule is None else rule.converged,
                relative_gains=() if rule is None else tuple(rule.relative_gains),
            )
        else:
            Q, Z = subspace_basis(op, Y, q, normalizer)
            G = Z.mT @ Z
            info = RandomizedSVDInfo("subspace", q, 2 * (q + 1), width)
        U, S, V = rayleigh_ritz(Q, Z, G, k)
    if transposed:
        U, V = V, U
    U, Vh = svd_flip(U, V.mT)
    return finish(U, S, Vh, info)


def _check_sketch(Y: torch.Tensor, op, dense: torch.Tensor | None, shape) -> None:
    """Raise for a non-finite first product: NaN/Inf in ``A`` (counted), or an overflow."""
    if bool(torch.isfinite(Y).all()):
        return
    if dense is not None:
        check_matrix(dense)  # raises with the NaN/Inf counts, unless the product merely overflowed
        largest = float(dense.abs().max())
    else:
        check_sparse_finite(op, shape)
        largest = float(op.values().abs().max())
    raise ValueError(
        f"A of shape {shape} is finite but its sketch A @ Omega overflows {op.dtype} "
        f"(largest |entry| {largest:.3g}); scale A down or pass float64"
    )


class _SettleRule:
    """The stopping rule of ``n_iter="auto"`` (see :func:`randomized_svd`, Notes).

    Called by the Krylov iteration with the (upper-triangle) Gram matrix of the basis after
    each block; keeps the captured energies and decides.
    """

    def __init__(self, total: torch.Tensor, k: int, dtype: torch.dtype) -> None:
        self.total = total  # ||A||_F**2 per matrix, float64 of shape (...)
        self.k = k
        # The residual ||A||_F**2 - sum(theta**2) is a difference: below this it is rounding (of
        # the products that formed Z, and of the sum of squares).
        self.noise = _AUTO_RESIDUAL_ULPS * torch.finfo(dtype).eps * total
        # Gains are differences of float64 eigenvalue sums of nested matrices: exact to about this.
        self.gain_floor = _AUTO_GAIN_ULPS * torch.finfo(torch.float64).eps * total
        self.energy: torch.Tensor | None = None
        self.gain: torch.Tensor | None = None
        self.converged = False
        self.relative_gains: list[float] = []

    def __call__(self, G: torch.Tensor) -> bool:
        # float64 eigenvalues: in float32 their rounding (~k eps ||G||) would swamp the gains.
        theta_sq = torch.linalg.eigvalsh(G.double(), UPLO="U")[..., -self.k :]
        energy = theta_sq.clamp_min(0).sum(dim=-1)
        if self.energy is None:
            self.energy = energy
            return False
        gain = (energy - self.energy).clamp_min(0)
        residual = torch.maximum(self.total - energy, self.noise)
        if self.gain is None:  # step 1: no ratio yet, the gain itself
            remaining = gain
        else:
            rho = gain / self.gain.clamp_min(torch.finfo(torch.float64).tiny)
            remaining = torch.where(rho < 1, gain * rho / (1 - rho).clamp_min(1e-12), torch.full_like(gain, torch.inf))
        settled = remaining <= torch.maximum(AUTO_TOL * residual, self.gain_floor)
        self.relative_gains.append(float((gain / residual.clamp_min(torch.finfo(torch.float64).tiny)).max()))
        self.energy, self.gain = energy, gain
        self.converged = bool(settled.all())
        return self.converged


def check_seed(seed: object) -> None:
    """Raise unless ``seed`` is None, a ``torch.Generator`` or an int that fits in 64 bits.

    A float is refused rather than truncated (``1.5`` is not ``1``), and so are bools and strings.
    """
    if seed is None or isinstance(seed, torch.Generator):
        return
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, a torch.Generator or None, got {seed!r} ({type(seed).__name__})")
    if not -(2**63) <= int(seed) < 2**64:
        raise ValueError(f"seed must fit in 64 bits (-2**63 <= seed < 2**64), got {seed!r}")


#: Multiplier of :func:`layer_seed` (a prime, so seeds of different runs rarely collide).
_LAYER_SEED_PRIME = 1_000_003


def layer_seed(seed: int, index: int) -> int:
    """The seed of the ``index``-th layer (or bucket of layers) of a run seeded with ``seed``.

    ``(seed * 1_000_003 + index) mod (2**63 - 1)``: distinct for the layers of one run, the same
    on every machine, and always a valid generator seed (``0 <= value < 2**63 - 1``), whatever
    ``seed`` is. Every per-layer random draw of svdkit (LoRA inits, LoRA extraction, the spectral
    tracker's start blocks) derives its seed here.

    Raises
    ------
    TypeError
        For a seed or index that is not an int (bools and floats are refused).
    ValueError
        For a negative index.
    """
    for name, value in (("seed", seed), ("index", index)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"layer_seed: {name} must be an int, got {value!r} ({type(value).__name__})")
    if index < 0:
        raise ValueError(f"layer_seed: index must be >= 0, got {index}")
    return (int(seed) * _LAYER_SEED_PRIME + int(index)) % (2**63 - 1)


def _plan(shape, k: int, oversamples: int, n_iter, method: str) -> tuple[int, int, bool]:
    """Block width ``l``, number of power/Krylov steps ``q`` (the most, for an adaptive run), and
    whether to use the exact SVD.

    The randomized path makes ``2 * (q + 1)`` passes over ``A``, each a product with a block of
    ``l`` columns (the benchmark's matrix-product floor uses the same plan).
    """
    r = min(shape[-2:])
    width = min(k + oversamples, r)
    q = _resolve_n_iter(n_iter, method, k, r)
    if method == "krylov" and (q + 1) * width > r:
        q = r // width - 1
    exact = width >= r or q < 0 or (method == "krylov" and q == 0 and n_iter != 0)
    return width, q, exact


def _validate(k, oversamples, n_iter, normalizer, method, shape) -> None:
    r = min(shape[-2:])
    if method not in _NORMALIZERS:
        raise ValueError(f"method must be 'krylov' or 'subspace', got {method!r}")
    if normalizer not in _NORMALIZERS[method]:
        raise ValueError(
            f"normalizer {normalizer!r} does not apply to method {method!r}; "
            f"choose one of {_NORMALIZERS[method]}"
        )
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= r:
        raise ValueError(f"k must be an int in [1, min(m, n)] = [1, {r}] for shape {tuple(shape)}, got {k!r}")
    if isinstance(oversamples, bool) or not isinstance(oversamples, (int, np.integer)) or oversamples < 0:
        raise ValueError(f"oversamples must be a non-negative int, got {oversamples!r}")
    if n_iter != "auto" and (isinstance(n_iter, bool) or not isinstance(n_iter, (int, np.integer)) or n_iter < 0):
        raise ValueError(f"n_iter must be 'auto' or a non-negative int, got {n_iter!r}")


def _resolve_n_iter(n_iter, method: str, k: int, r: int) -> int:
    if n_iter != "auto":
        return int(n_iter)
    if method == "krylov":
        return AUTO_MAX_N_ITER
    return 7 if k < 0.1 * r else 4
