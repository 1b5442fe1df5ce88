"""The optimizer's trajectory through the SVD: :class:`TrajectoryRecorder`.

The recorder keeps the last ``max_snapshots`` parameter vectors ``theta_t`` (every ``every``
steps) in a preallocated ring buffer. :meth:`TrajectoryRecorder.analyze` stacks the step-to-step
updates ``Delta_t = theta_t - theta_{t-1}`` into a matrix of shape (T - 1, dim) and reads its
singular values: how many directions the movement effectively uses, and how many explain 90 and
99 % of it (energy ``sum(s**2)``, the squared length of the updates).

The singular values come from the (T - 1) x (T - 1) Gram matrix of the updates in float64.
It also measures how much of each new gradient ``g`` lies in the subspace that recent updates
span: ``overlap = ||P_k g||**2 / ||g||**2``, with ``P_k`` the projector onto the top-``k`` right
singular vectors of the update matrix. Gur-Ari, Roberts & Dyer (arXiv:1812.04754) found that,
after a short early phase, gradients lie mostly in a tiny subspace spanned by the top Hessian
eigenvectors (``k`` about the number of classes); this measure uses the subspace the optimizer
actually moved in, which needs no Hessian-vector products.

Memory
------
With ``n_params <= max_dim`` the snapshots are the flattened parameters themselves (float32).
Above it, every vector (snapshot and gradient) is mapped to ``max_dim`` dimensions by a seeded
CountSketch (a sparse random projection: each coordinate is added, with a random sign, to one
random bucket), which preserves inner products in expectation, so the singular values, energy
ranks and overlaps are those of the sketched vectors and approximate the exact ones (the more
closely the larger ``max_dim`` is compared with ``max_snapshots``). The bound
:attr:`TrajectoryRecorder.memory_bound_bytes` is::

    max_snapshots * dim * 4          the ring of snapshots
    + top_k * dim * 4                the cached update subspace
    + 5 * n_params  (projected only) the sketch: an int32 bucket and an int8 sign per parameter

plus 16 bytes per recorded gradient overlap. ``analyze()`` and the subspace update need
another (T - 1) * dim * 4 bytes while they run; flattening needs one parameter's worth.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from torch import nn

from ...exports import json_text, pandas
from ...linalg import effective_rank, energy, energy_rank
from ._checks import positive_int
from .callbacks import trainer_callback

__all__ = ["TrajectoryAnalysis", "TrajectoryRecorder"]


@dataclass(frozen=True, eq=False)
class TrajectoryAnalysis:
    """The SVD of a training trajectory's step-to-step updates.

    Attributes
    ----------
    steps : tuple of int
        Steps of the snapshots, oldest first; the updates are between consecutive ones.
    singular_values : float64 array of shape (T - 1,)
        Singular values of the update matrix, descending (padded with zeros to T - 1 rows).
    explained : float64 array of shape (T - 1,)
        Cumulative fraction of the movement's energy ``sum(s**2)`` in the top ``k`` directions.
    effective_directions : float
        ``exp`` of the entropy of ``s**2 / sum(s**2)``: the effective number of directions.
    dims_90, dims_99 : int
        Directions that explain 90 and 99 % of the movement's energy.
    path_length : float
        ``sum_t ||Delta_t||``.
    displacement : float
        ``||theta_last - theta_first||``.
    overlap_steps : int64 array of shape (n,)
        Steps at which a gradient was recorded.
    overlaps : float64 array of shape (n,)
        ``||P_k g||**2 / ||g||**2`` at those steps (NaN for a zero gradient).
    top_k : int
        The ``k`` of the overlap.
    n_params, dim : int
        Parameters recorded, and the dimension of the stored vectors.
    projected : bool
        Whether the vectors are CountSketch projections (``dim < n_params``).
    """

    steps: tuple[int, ...]
    singular_values: np.ndarray
    explained: np.ndarray
    effective_directions: float
    dims_90: int
    dims_99: int
    path_length: float
    displacement: float
    overlap_steps: np.ndarray
    overlaps: np.ndarray
    top_k: int
    n_params: int
    dim: int
    projected: bool

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {
            "steps": list(self.steps),
            "singular_values": self.singular_values.tolist(),
            "explained": self.explained.tolist(),
            "effective_directions": self.effective_directions,
            "dims_90": self.dims_90,
            "dims_99": self.dims_99,
            "path_length": self.path_length,
            "displacement": self.displacement,
            "overlap_steps": self.overlap_steps.tolist(),
            "overlaps": [None if np.isnan(x) else float(x) for x in self.overlaps],
            "top_k": self.top_k,
            "n_params": self.n_params,
            "dim": self.dim,
            "projected": self.projected,
        }

    def to_json(self, path: str | os.PathLike | None = None, *, indent: int = 2) -> str:
        """JSON text of :meth:`to_dict`; written to ``path`` when given."""
        return json_text(self.to_dict(), path, indent=indent)

    def to_pandas(self):
        """A ``pandas.DataFrame``, one row per direction: ``direction``, ``singular_value``, ``explained``.

        Raises
        ------
        ImportError
            Without pandas.
        """
        pd = pandas()
        k = np.arange(1, len(self.singular_values) + 1)
        return pd.DataFrame({"direction": k, "singular_value": self.singular_values, "explained": self.explained})

    def to_table(self) -> str:
        """A plain-text summary: snapshots, effective directions, 90/99 % dimensions, path, overlap."""
        space = f"sketched to {self.dim} dims" if self.projected else f"{self.n_params} parameters"
        finite = self.overlaps[np.isfinite(self.overlaps)] if len(self.overlaps) else self.overlaps
        overlap = f"{float(np.mean(finite)):.3g}" if len(finite) else "-"
        lines = [
            f"trajectory of {len(self.steps)} snapshots ({space})",
            f"effective directions  {self.effective_directions:.4g}",
            f"directions for 90 %   {self.dims_90}",
            f"directions for 99 %   {self.dims_99}",
            f"path length           {self.path_length:.4g}",
            f"displacement          {self.displacement:.4g}",
            f"mean gradient overlap {overlap} (top-{self.top_k} update subspace, {len(self.overlaps)} gradients)",
        ]
        return "\n".join(lines)


def _gram_svd(D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values and left vectors of a wide ``D`` (T, dim) from its (T, T) Gram matrix.

    ``D D^T = U diag(S**2) U^T``; for T much smaller than dim this is one matrix product and a
    tiny eigenproblem, about 50 times faster than LAPACK's SVD of ``D`` (float64 keeps singular
    values down to ~1e-7 of the largest accurate).

    Returns
    -------
    S : Tensor of shape (T,), descending
    U : Tensor of shape (T, T)
    """
    evals, U = torch.linalg.eigh(D @ D.T)
    return evals.flip(0).clamp_min(0).sqrt(), U.flip(1)


def _parameters(params) -> list[torch.Tensor]:
    if isinstance(params, nn.Module):
        tensors = [p for p in params.parameters() if p.requires_grad]
        what = f"{type(params).__name__} has no trainable parameters"
    else:
        if isinstance(params, torch.Tensor):
            params = [params]
        tensors = []
        for item in params:
            tensor = item[1] if isinstance(item, tuple) else item
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"params must be tensors or (name, tensor) pairs, got {type(item).__name__}")
            tensors.append(tensor)
        what = "params is empty"
    if not tensors:
        raise ValueError(f"nothing to record: {what}")
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"parameters on several devices ({sorted(map(str, devices))}); record each device separately")
    return tensors


class TrajectoryRecorder:
    """Record parameter snapshots during training and analyze the updates through the SVD.

    Parameters
    ----------
    params : nn.Module or iterable of Tensor or of (name, Tensor)
        A module means its trainable parameters.
    every : int
        Take a snapshot every ``every`` steps.
    max_snapshots : int
        Snapshots kept (a ring: older ones are dropped); at least 2.
    max_dim : int
        Above this many parameters, vectors are sketched to ``max_dim`` dimensions (module docstring).
    top_k : int
        Dimension of the update subspace for the gradient overlap.
    seed : int
        Seed of the sketch.

    Raises
    ------
    ValueError
        For ``every``, ``max_dim`` or ``top_k`` below 1, ``max_snapshots`` below 2, or no
        parameters.

    Notes
    -----
    Drive it with :meth:`step` after each optimizer step (and :meth:`record_gradient` between
    ``backward()`` and ``optimizer.step()``), or :meth:`attach` it to an optimizer, which does
    both with a pre- and a post-step hook, or through :meth:`trainer_callback`. The gradient at
    step ``t`` is compared with the updates up to ``theta_t``, so it never sees its own update.
    """

    def __init__(
        self,
        params: nn.Module | Iterable,
        every: int = 1,
        max_snapshots: int = 64,
        *,
        max_dim: int = 1 << 16,
        top_k: int = 10,
        seed: int = 0,
    ) -> None:
        self.every = positive_int(every, "every")
        max_snapshots = positive_int(max_snapshots, "max_snapshots")
        if max_snapshots < 2:
            raise ValueError(f"max_snapshots must be >= 2 (updates are differences of snapshots), got {max_snapshots}")
        self.max_snapshots = max_snapshots
        self.max_dim = positive_int(max_dim, "max_dim")
        self.top_k = positive_int(top_k, "top_k")
        self.seed = int(seed)
        self.params = _parameters(params)
        self.device = self.params[0].device
        self.n_params = sum(p.numel() for p in self.params)
        self.projected = self.n_params > self.max_dim
        self.dim = self.max_dim if self.projected else self.n_params
        self._sketch: list[tuple[torch.Tensor, torch.Tensor]] = []
        if self.projected:
            generator = torch.Generator().manual_seed(self.seed)
            for p in self.params:
                bucket = torch.randint(0, self.dim, (p.numel(),), generator=generator, dtype=torch.int32)
                sign = torch.randint(0, 2, (p.numel(),), generator=generator, dtype=torch.int8) * 2 - 1
                self._sketch.append((bucket.to(self.device), sign.to(self.device)))
        self._ring: torch.Tensor | None = None
        self._steps: list[int] = []  # steps of the snapshots in the ring, oldest first
        self._head = 0  # next ring slot
        self._basis: torch.Tensor | None = None
        self._basis_stale = True
        self._overlap_steps: list[int] = []
        self._overlaps: list[torch.Tensor] = []
        self._step = 0
        self._hooks: list = []

    # -- memory --------------------------------------------------------------------------------
    @property
    def memory_bound_bytes(self) -> int:
        """Bytes the recorder's stored tensors can reach (module docstring), overlaps aside."""
        sketch = 5 * self.n_params if self.projected else 0
        return 4 * self.dim * (self.max_snapshots + self.top_k) + sketch

    def memory_bytes(self) -> int:
        """Bytes held now by the stored tensors (ring, subspace, sketch)."""
        tensors = [t for pair in self._sketch for t in pair]
        tensors += [t for t in (self._ring, self._basis) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def __len__(self) -> int:
        return len(self._steps)

    def __repr__(self) -> str:
        how = f"sketched to {self.dim}" if self.projected else "exact"
        return f"TrajectoryRecorder({self.n_params} params, {how}, every={self.every}, {len(self)}/{self.max_snapshots} snapshots)"

    # -- flattening ----------------------------------------------------------------------------
    @torch.no_grad()
    def _flatten(self, tensors: list[torch.Tensor | None], out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensors as one float32 vector of shape (dim,), exact or sketched; None counts as zeros."""
        if out is None:
            out = torch.zeros(self.dim, dtype=torch.float32, device=self.device)
        else:
            out.zero_()
        if self.projected:
            for t, (bucket, sign) in zip(tensors, self._sketch):
                if t is not None:
                    out.index_add_(0, bucket, t.detach().reshape(-1).to(out.device, torch.float32) * sign)
        else:
            offset = 0
            for t, p in zip(tensors, self.params):
                n = p.numel()
                if t is not None:
                    out[offset : offset + n].copy_(t.detach().reshape(-1))
                offset += n
        return out

    # -- snapshots -----------------------------------------------------------------------------
    def snapshot(self, step: int | None = None) -> None:
        """Store the parameters now, as ``step`` (default: the current step counter)."""
        if step is not None:
            self._step = int(step)
        if self._steps and self._steps[-1] == self._step:
            return
        if self._ring is None:
            self._ring = torch.zeros(self.max_snapshots, self.dim, dtype=torch.float32, device=self.device)
        self._flatten(self.params, out=self._ring[self._head])
        self._head = (self._head + 1) % self.max_snapshots
        self._steps.append(self._step)
        if len(self._steps) > self.max_snapshots:
            self._steps.pop(0)
        self._basis_stale = True

    def snapshots(self) -> tuple[list[int], torch.Tensor]:
        """The stored snapshots, oldest first.

        Returns
        -------
        steps : list of int
        vectors : Tensor of shape (T, dim), float32, on the parameters' device
        """
        if self._ring is None:
            return [], torch.zeros(0, self.dim)
        T = len(self._steps)
        order = [(self._head - T + i) % self.max_snapshots for i in range(T)]
        return list(self._steps), self._ring[order]

    def updates(self) -> torch.Tensor:
        """Step-to-step updates ``theta_t - theta_{t-1}``, Tensor of shape (T - 1, dim)."""
        _, X = self.snapshots()
        return X[1:] - X[:-1]

    def step(self, step: int | None = None) -> bool:
        """Advance the step counter (or set it) and snapshot if due; returns whether it did."""
        self._step = self._step + 1 if step is None else int(step)
        if self._step % self.every == 0:
            self.snapshot()
            return True
        return False

    # -- gradients -----------------------------------------------------------------------------
    @torch.no_grad()
    def _update_basis(self) -> torch.Tensor | None:
        if self._basis_stale:
            self._basis_stale = False
            self._basis = None
            if len(self._steps) >= 2:
                D = self.updates().double()
                S, U = _gram_svd(D)
                k = min(self.top_k, int((S > S[0] * 1e-6).sum()) if S[0] > 0 else 0)
                if k > 0:
                    self._basis = ((U[:, :k] / S[:k]).T @ D).float().contiguous()
        return self._basis

    @torch.no_grad()
    def record_gradient(self, step: int | None = None) -> torch.Tensor | None:
        """Measure how much of the current gradient lies in the top-``k`` update subspace.

        Reads ``p.grad`` of the recorded parameters (call it after ``backward()``, before
        ``optimizer.step()``).

        Parameters
        ----------
        step : int, optional
            The step to file the value under; default: the current step counter.

        Returns
        -------
        Tensor of shape () or None
            ``||P_k g||**2 / ||g||**2`` on the parameters' device (NaN for a zero gradient),
            or None while fewer than two snapshots (no update) exist.
        """
        basis = self._update_basis()
        if basis is None:
            return None
        g = self._flatten([p.grad for p in self.params])
        total = g.square().sum()
        inside = (basis @ g).square().sum()
        overlap = torch.where(total > 0, inside / total.clamp_min(torch.finfo(total.dtype).tiny), torch.full_like(total, float("nan")))
        self._overlap_steps.append(self._step if step is None else int(step))
        self._overlaps.append(overlap)
        return overlap

    def gradient_overlaps(self) -> tuple[np.ndarray, np.ndarray]:
        """Recorded overlaps: (steps int64 array (n,), overlaps float64 array (n,))."""
        values = torch.stack(self._overlaps).double().cpu().numpy() if self._overlaps else np.zeros(0)
        return np.asarray(self._overlap_steps, dtype=np.int64), values

    # -- analysis ------------------------------------------------------------------------------
    @torch.no_grad()
    def analyze(self) -> TrajectoryAnalysis:
        """The SVD of the stored updates (see :class:`TrajectoryAnalysis`).

        Raises
        ------
        ValueError
            With fewer than two snapshots.
        """
        if len(self._steps) < 2:
            raise ValueError(f"analyze() needs at least 2 snapshots, have {len(self._steps)}; call step() or snapshot() during training")
        steps, X = self.snapshots()
        D = (X[1:] - X[:-1]).double()
        S = _gram_svd(D)[0].cpu()
        overlap_steps, overlaps = self.gradient_overlaps()
        return TrajectoryAnalysis(
            steps=tuple(steps),
            singular_values=S.numpy(),
            explained=energy(S).numpy(),
            effective_directions=float(effective_rank(S, kind="variance")),
            dims_90=int(energy_rank(S, 0.9)),
            dims_99=int(energy_rank(S, 0.99)),
            path_length=float(torch.linalg.vector_norm(D, dim=1).sum()),
            displacement=float(torch.linalg.vector_norm(X[-1].double() - X[0].double())),
            overlap_steps=overlap_steps,
            overlaps=overlaps,
            top_k=self.top_k,
            n_params=self.n_params,
            dim=self.dim,
            projected=self.projected,
        )

    # -- attaching -----------------------------------------------------------------------------
    def attach(
        self, optimizer: torch.optim.Optimizer, *, gradients: bool = True, record_initial: bool = True
    ) -> "TrajectoryRecorder":
        """Snapshot after ``optimizer.step()`` (and record gradients before it) through hooks.

        Parameters
        ----------
        optimizer : torch.optim.Optimizer
        gradients : bool
            Also call :meth:`record_gradient` before every step whose parameters were snapshot.
        record_initial : bool
            Snapshot the current parameters now if none is stored.

        Returns
        -------
        TrajectoryRecorder
            ``self``; usable as a context manager that detaches on exit.
        """
        if self._hooks:
            raise RuntimeError("this recorder is already attached to an optimizer; call detach() first")
        if not hasattr(optimizer, "register_step_post_hook"):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if record_initial and not self._steps:
            self.snapshot()
        if gradients:
            self._hooks.append(optimizer.register_step_pre_hook(lambda opt, args, kwargs: self._pre_step()))
        self._hooks.append(optimizer.register_step_post_hook(lambda opt, args, kwargs: self.step()))
        return self

    def _pre_step(self) -> None:
        if self._step % self.every == 0:
            self.record_gradient()

    def detach(self) -> None:
        """Remove the optimizer hooks (if any); the recorder stays usable."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    @property
    def attached(self) -> bool:
        """Whether optimizer hooks are registered."""
        return bool(self._hooks)

    def train_begin(self, step: int = 0) -> None:
        """Snapshot the starting point as ``step`` (a no-op if that step is stored already)."""
        self.snapshot(step)

    def pre_optimizer_step(self, step: int) -> None:
        """Record the gradient before the update of ``step``, on the snapshot cadence."""
        if int(step) % self.every == 0:
            self.record_gradient(step)

    def flush(self) -> None:
        """Nothing is buffered: present so that every observer can be flushed alike."""

    def trainer_callback(self):
        """A transformers ``TrainerCallback`` that drives this recorder."""
        return trainer_callback(self)

    def __enter__(self) -> "TrajectoryRecorder":
        return self

    def __exit__(self, *exc_info) -> None:
        self.detach()
