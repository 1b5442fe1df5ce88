"""The computation behind :class:`~svdkit.analysis.training.SpectralTracker`.

:class:`LayerSpectra` holds the tracked weights and computes, on their own device and under
``torch.no_grad``:

- :meth:`LayerSpectra.fast`: an estimate of ``sigma_max`` by one block Krylov step on ``W^T W``
  with Rayleigh-Ritz, warm-started from the previous call's top Ritz vectors, and the exact
  Frobenius norm;
- :meth:`LayerSpectra.full`: every metric from the singular values (:func:`svdkit.linalg.svdvals`
  and :mod:`svdkit.linalg.spectrum`).

Batching. Every weight is seen with rows >= cols (transposing leaves singular values unchanged).
A large weight (``>= 2**15`` elements) is iterated in place, since copying it would cost as much
as one iteration; small ones are copied, with one ``_foreach_copy_``, into a reused stacked
buffer, and weights of different shapes share one zero-padded buffer while the padding stays
cheap (zero padding adds only zero singular values). A step of fast mode thus costs, per
buffer, ``2 * power_iters + 1`` batched products of a block of at most ``(power_iters + 1) * b``
rows with the weight, a small QR and eigendecomposition, and one norm: about a dozen kernel
launches, no Python loop over entries.

Why Krylov and Ritz rather than plain power iteration: when a new direction overtakes the top
one (Adam's first steps add a large, nearly rank-one update to every weight), a warm-started
power iteration trails it by several percent for tens of steps; the Krylov space with
Rayleigh-Ritz follows it within a fraction of a percent at one extra pass over the weight.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ...linalg import (
    condition_number,
    effective_rank,
    frobenius_norm,
    layer_seed,
    nuclear_norm,
    spectral_norm,
    stable_rank,
    svdvals,
)
from ...views import get_view

__all__ = ["FULL_FUNCTIONS", "LayerSpectra", "host"]

#: The functions behind :data:`~svdkit.analysis.training.METRICS`, in that order.
FULL_FUNCTIONS: tuple[Callable, ...] = (
    spectral_norm,
    frobenius_norm,
    stable_rank,
    nuclear_norm,
    condition_number,
    effective_rank,
)

# Weights of different shapes share one zero-padded buffer while it stays this small (elements)
# or wastes at most this fraction over their own size.
_PAD_BUDGET = 1 << 18
_PAD_WASTE = 1.25
# Weights at least this large (elements) are iterated in place rather than copied into a stack.
_DIRECT_NUMEL = 1 << 15


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _eigh(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched ``torch.linalg.eigh`` of (G, k, k); NaN for the matrices LAPACK refuses (non-finite input)."""
    try:
        return torch.linalg.eigh(A)
    except torch.linalg.LinAlgError:
        values, vectors = torch.full_like(A[..., 0], math.nan), torch.full_like(A, math.nan)
        for g in range(A.shape[0]):
            if bool(torch.isfinite(A[g]).all()):
                values[g], vectors[g] = torch.linalg.eigh(A[g])
        return values, vectors


def host(tensors: Sequence[torch.Tensor]) -> np.ndarray:
    """Concatenate 1-D or 2-D tensors (along dim 0) into one float64 host array, one transfer per device."""
    devices = {t.device for t in tensors}
    if len(devices) == 1:
        return torch.cat(list(tensors)).double().cpu().numpy()
    return torch.cat([t.double().cpu() for t in tensors]).numpy()


@dataclass
class _Layer:
    """One tracked weight, seen with rows >= cols."""

    name: str
    module: nn.Module
    param: torch.Tensor
    ptr: int
    matrix: torch.Tensor  # canonical view (rows >= cols) of the weight matrix
    live: bool  # the view shares the weight's storage (else it is re-read every step)


@dataclass
class _Bucket:
    """Weights whose power iterations run as one batch."""

    members: list[int]
    buffer: torch.Tensor  # (G, R, C); the weight itself (unsqueezed) when ``direct``
    direct: bool
    dst: list[torch.Tensor] = field(default_factory=list)
    v: torch.Tensor | None = None  # (G, b, C) warm-start blocks of orthonormal rows
    restart: torch.Tensor | None = None  # (G, b, C) fixed orthonormal start blocks
    warm: bool = False


def _read(name: str, module: nn.Module) -> _Layer:
    param = module.weight
    matrix = get_view(module).read(module).detach()
    if matrix.shape[0] < matrix.shape[1]:
        matrix = matrix.mT
    live = matrix.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()
    return _Layer(name, module, param, param.data_ptr(), matrix, live)


class LayerSpectra:
    """Spectral quantities of a fixed list of layers, computed in batches.

    Parameters
    ----------
    names : sequence of str
    modules : sequence of nn.Module
        Modules with a weight view (:mod:`svdkit.views`), one per name.
    power_iters, warmup_iters, block_size, seed
        See :class:`~svdkit.analysis.training.SpectralTracker`.

    Attributes
    ----------
    bucket_order : int64 array of shape (n_layers,)
        Layer indices in the order of :meth:`fast`'s concatenated outputs.
    group_order : int64 array of shape (n_layers,)
        Layer indices in the order of :meth:`full`'s concatenated outputs.
    """

    def __init__(
        self,
        names: Sequence[str],
        modules: Sequence[nn.Module],
        *,
        power_iters: int,
        warmup_iters: int,
        block_size: int,
        seed: int,
    ) -> None:
        self.names, self.modules = list(names), list(modules)
        self.power_iters, self.warmup_iters, self.block_size, self.seed = power_iters, warmup_iters, block_size, seed
        self.layers: list[_Layer] | None = None
        self.buckets: list[_Bucket] = []
        self.groups: list[list[int]] = []
        self.bucket_order = np.zeros(0, dtype=np.int64)
        self.group_order = np.zeros(0, dtype=np.int64)
        self._warned = False

    # -- layout ----------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Rebuild the layout on first use and whenever a weight was replaced or re-allocated."""
        if self.layers is None or any(
            L.module.weight is not L.param or L.param.data_ptr() != L.ptr for L in self.layers
        ):
            self._build()

    def _build(self) -> None:
        self.layers = [_read(n, m) for n, m in zip(self.names, self.modules)]
        exact: dict[tuple, list[int]] = {}
        for i, layer in enumerate(self.layers):
            M = layer.matrix
            exact.setdefault((tuple(M.shape), M.device, _work_dtype(M.dtype)), []).append(i)
        self.groups = list(exact.values())
        self.group_order = np.array([i for g in self.groups for i in g], dtype=np.int64)
        by_place: dict[tuple, list[tuple[tuple[int, int], list[int]]]] = {}
        for (shape, device, dtype), members in exact.items():
            by_place.setdefault((device, dtype), []).append((shape, members))
        buckets: list[tuple[list[int], torch.device, torch.dtype]] = []
        for (device, dtype), groups in by_place.items():
            groups.sort(key=lambda item: item[0][0] * item[0][1])
            current: list[int] = []
            real = rows = cols = 0
            for (r, c), members in groups:
                if r * c >= _DIRECT_NUMEL:
                    buckets.extend(([i], device, dtype) for i in members)
                    continue
                new_real = real + len(members) * r * c
                new_rows, new_cols = max(rows, r), max(cols, c)
                padded = (len(current) + len(members)) * new_rows * new_cols
                if current and padded > max(_PAD_BUDGET, _PAD_WASTE * new_real):
                    buckets.append((current, device, dtype))
                    current, real, rows, cols = [], 0, 0, 0
                    new_real, new_rows, new_cols = len(members) * r * c, r, c
                current = current + members
                real, rows, cols = new_real, new_rows, new_cols
            if current:
                buckets.append((current, device, dtype))
        self.buckets = [self._bucket(members, device, dtype, k) for k, (members, device, dtype) in enumerate(buckets)]
        self.bucket_order = np.array([i for b in self.buckets for i in b.members], dtype=np.int64)

    def _bucket(self, members: list[int], device: torch.device, dtype: torch.dtype, index: int) -> _Bucket:
        mats = [self.layers[i].matrix for i in members]
        shapes = [tuple(M.shape) for M in mats]
        R, C = max(s[0] for s in shapes), max(s[1] for s in shapes)
        direct = len(mats) == 1 and mats[0].dtype == dtype and self.layers[members[0]].live
        if direct:
            buffer, dst = mats[0].unsqueeze(0), []
        else:
            buffer = torch.zeros(len(mats), R, C, device=device, dtype=dtype)
            dst = [buffer[g, : s[0], : s[1]] for g, s in enumerate(shapes)]
        generator = torch.Generator().manual_seed(layer_seed(self.seed, index))
        start = torch.randn(len(mats), C, min(self.block_size, C), generator=generator, dtype=torch.float64)
        start = torch.linalg.qr(start).Q.mT.to(device=device, dtype=dtype).contiguous()
        return _Bucket(members, buffer, direct, dst, start.clone(), start, False)

    def _matrix(self, i: int) -> torch.Tensor:
        layer = self.layers[i]
        return layer.matrix if layer.live else _read(layer.name, layer.module).matrix

    def _load(self, bucket: _Bucket) -> torch.Tensor:
        if not bucket.direct:
            torch._foreach_copy_(bucket.dst, [self._matrix(i) for i in bucket.members])
        return bucket.buffer

    # -- computation -----------------------------------------------------------------------------
    @torch.no_grad()
    def fast(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per bucket: ``(e, f)``, both of shape (G,): ``e <= sigma_max**2`` (a Ritz value) and ``f = ||W||_F``.

        One warm-started block Krylov step on ``A = W^T W`` (``power_iters`` = d products): from
        the previous block ``V`` (G, b, C) of orthonormal rows, ``K = [V; V A; ...; V A^d]``
        is orthonormalised (``K^T = Q R``), ``P = Q^T W^T`` takes one more pass, and the
        eigenvalues of ``P P^T`` are the Ritz values of ``A`` on the Krylov space: the largest
        bounds ``sigma_max**2`` from below, and the top ``b`` Ritz vectors are the next ``V``.
        Row blocks keep every product in the fast layout (``(b, C) @ (C, R)``). The caller
        takes the square root on the host, so nothing here waits for the device.
        """
        for bucket in self.buckets:
            if not bucket.warm:  # a new layout or a restart: restarted Krylov steps first
                for _ in range(max(1, -(-self.warmup_iters // self.power_iters))):
                    Q, P = self._krylov(bucket)
                    ritz, vectors = _eigh(torch.bmm(P, P.mT))
                    bucket.v = torch.bmm(vectors[..., -bucket.v.shape[1] :].mT, Q.mT)
                bucket.warm = True
        out = []
        # The small Rayleigh-Ritz eigenproblems of all buckets on one device go in one batch.
        spaces = [self._krylov(bucket) for bucket in self.buckets]
        by_shape: dict[tuple, list[int]] = {}
        for k, (Q, P) in enumerate(spaces):
            by_shape.setdefault((P.device, P.dtype, P.shape[1]), []).append(k)
        solved: list = [None] * len(spaces)
        for ks in by_shape.values():
            grams = [torch.bmm(spaces[k][1], spaces[k][1].mT) for k in ks]
            ritz, vectors = _eigh(torch.cat(grams) if len(grams) > 1 else grams[0])
            start = 0
            for k in ks:
                size = spaces[k][1].shape[0]
                solved[k] = (ritz[start : start + size], vectors[start : start + size])
                start += size
        for bucket, (Q, _), (ritz, vectors) in zip(self.buckets, spaces, solved):
            bucket.v = torch.bmm(vectors[..., -bucket.v.shape[1] :].mT, Q.mT)
            out.append((ritz[:, -1], torch.linalg.vector_norm(bucket.buffer, dim=(1, 2))))
        return out

    def _krylov(self, bucket: _Bucket) -> tuple[torch.Tensor, torch.Tensor]:
        """Orthonormal Krylov basis ``Q`` (G, C, (d + 1) b) from the bucket's block, and ``P = Q^T W^T``."""
        W = self._load(bucket)
        Wt = W.mT
        blocks = [bucket.v]
        for _ in range(self.power_iters):
            blocks.append(torch.bmm(torch.bmm(blocks[-1], Wt), W))
        Q = torch.linalg.qr(torch.cat(blocks, dim=1).mT).Q
        return Q, torch.bmm(Q.mT, Wt)

    @torch.no_grad()
    def full(self) -> list[torch.Tensor]:
        """Per group of equal shapes: every metric of :data:`FULL_FUNCTIONS`, float64 of shape (G, 6).

        Non-finite weights give NaN rows (with one warning).
        """
        out = []
        for members in self.groups:
            stacked = torch.stack([self._matrix(i) for i in members])
            try:
                S = svdvals(stacked)
                values = torch.stack([fn(S) for fn in FULL_FUNCTIONS], dim=1)
            except ValueError as exc:
                if not self._warned:
                    names = [self.names[i] for i in members]
                    warnings.warn(f"spectral tracker: recording NaN for layers {names}: {exc}", RuntimeWarning, stacklevel=4)
                    self._warned = True
                values = torch.full((len(members), len(FULL_FUNCTIONS)), math.nan, dtype=torch.float64, device=stacked.device)
            out.append(values)
        return out

    def restart_nonfinite(self) -> None:
        """Restart the warm-start blocks that non-finite weights poisoned (one host sync per bucket)."""
        for bucket in self.buckets:
            if not bool(torch.isfinite(bucket.v).all()):
                bucket.v, bucket.warm = bucket.restart.clone(), False
