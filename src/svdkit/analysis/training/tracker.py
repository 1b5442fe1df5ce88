"""Per-layer spectral metrics tracked during training: :class:`SpectralTracker`.

Two modes, with different costs and different metrics:

==================  ======================================================  =======================
metric              meaning                                                 modes
==================  ======================================================  =======================
``sigma_max``       largest singular value ``||W||_2``                      fast (estimate), full
``frobenius_norm``  ``||W||_F``, exact                                      fast, full
``stable_rank``     ``||W||_F**2 / sigma_max**2``                           fast (estimate), full
``nuclear_norm``    ``sum(s)``                                              full
``condition_number`` ``s_max / s_min`` over ``min(m, n)`` values             full
``effective_rank``  ``exp(H(s / sum(s)))`` (Roy & Vetterli)                 full
==================  ======================================================  =======================

``mode="fast"`` estimates ``sigma_max`` by one block Krylov step on ``W^T W`` per step (a block
of ``block_size`` vectors, ``power_iters`` products, then Rayleigh-Ritz), warm-started from the
previous step's top Ritz vectors, and computes the Frobenius norm exactly; their ratio gives the
stable rank. The metrics in the last three rows need every singular value, which a few Krylov
vectors cannot give: asking fast mode for them is an error unless ``full_every`` is set, in which case they
(and exact values of the first three) are computed from the full spectrum every ``full_every``
steps and left empty (NaN) in between. ``mode="full"`` computes the singular values
(:func:`svdkit.linalg.svdvals`) every ``every`` steps and every metric from them with
:mod:`svdkit.linalg.spectrum`.

Fast mode batches equal shapes into reused buffers and costs a handful of kernel launches per
step (see :mod:`svdkit.analysis.training.spectra`). Everything runs under ``torch.no_grad`` on
the weights' own device; values reach the host only when records are flushed to the sinks,
every ``flush_every`` records, when :attr:`SpectralTracker.history` is read, and on
:meth:`~SpectralTracker.flush` / :meth:`~SpectralTracker.close`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from ...surgery import TargetSpec, find_targets
from ...views import get_view
from ._checks import positive_int
from .callbacks import trainer_callback
from .sinks import Sink, TrackerHistory
from .spectra import LayerSpectra, host

__all__ = ["FAST_METRICS", "FULL_SPECTRUM_METRICS", "METRICS", "SpectralTracker"]

FAST_METRICS = ("sigma_max", "frobenius_norm", "stable_rank")
FULL_SPECTRUM_METRICS = ("nuclear_norm", "condition_number", "effective_rank")
METRICS = FAST_METRICS + FULL_SPECTRUM_METRICS


class SpectralTracker:
    """Track per-layer spectral metrics of a model's weights against the training step.

    Parameters
    ----------
    model : nn.Module
    every : int
        Record every ``every`` steps (in full mode: compute the spectrum every ``every`` steps).
    target_modules : str, list of str, or None
        PEFT-style selection of layers (see :func:`svdkit.surgery.find_targets`); None tracks
        every Linear, Conv1D and Conv2d except the output head.
    metrics : sequence of str, optional
        Names from :data:`METRICS`. Default: :data:`FAST_METRICS` in fast mode (plus
        :data:`FULL_SPECTRUM_METRICS` when ``full_every`` is set), all of :data:`METRICS` in full mode.
    mode : {"fast", "full"}
        See the module docstring.
    exclude_modules, kinds, include_embeddings, include_head
        Passed to :func:`~svdkit.surgery.find_targets`.
    power_iters : int
        Krylov depth: products with ``W^T W`` per fast step (each reads the weight twice; the
        Rayleigh-Ritz step reads it once more).
    block_size : int
        Vectors in the block (at most the weight's smaller dimension). A block follows a top
        direction that overtakes another far sooner than one vector does, at little extra
        cost: the products are memory-bound.
    warmup_iters : int
        Products the first time a weight is seen (restarted Krylov steps), before warm starts
        take over.
    full_every : int, optional
        Fast mode only: also compute the full spectrum every ``full_every`` steps, which gives
        the full-spectrum metrics on that slower cadence.
    sinks : sequence of Sink
        Extra destinations (:class:`~svdkit.analysis.training.CSVSink`,
        :class:`~svdkit.analysis.training.TensorBoardSink`); the in-memory :attr:`history` is always kept.
    flush_every : int
        Records held on the device before they are moved to the host and written to the sinks.
    seed : int
        Seed of the start blocks.

    Raises
    ------
    ValueError
        For ``every``, ``power_iters``, ``block_size``, ``warmup_iters``, ``full_every`` or
        ``flush_every`` below 1, an unknown mode or metric, a fast-mode metric that needs the
        full spectrum without ``full_every``, or a selection that selects no layer.

    Notes
    -----
    Attach it in one of three ways: call :meth:`step` after each optimizer step in a loop;
    :meth:`attach` it to an optimizer (a post-step hook); or pass :meth:`trainer_callback` to a
    transformers ``Trainer``. The step counter counts calls to :meth:`step` (the first is step
    1); :meth:`record` records now, e.g. step 0 before training.

    The fast ``sigma_max`` is a Ritz value, a lower bound of the exact value; the warm start
    carries the work over from step to step. Measured against ``torch.linalg.svdvals`` it stays
    within a fraction of a percent, also through Adam's first steps on a fresh network, which
    add a large, nearly rank-one update to every weight (``benchmarks/tracker_overhead.py``).

    Examples
    --------
    >>> tracker = SpectralTracker(model, every=1, mode="fast").attach(optimizer)  # doctest: +SKIP
    >>> ...  # train
    >>> tracker.history.series("fc1", "stable_rank")  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        every: int = 1,
        target_modules: TargetSpec = None,
        metrics: Sequence[str] | None = None,
        mode: str = "fast",
        *,
        exclude_modules: TargetSpec = (),
        kinds: Sequence[str] | None = None,
        include_embeddings: bool = False,
        include_head: bool = False,
        power_iters: int = 2,
        block_size: int = 2,
        warmup_iters: int = 50,
        full_every: int | None = None,
        sinks: Sequence[Sink] = (),
        flush_every: int = 64,
        seed: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.every = positive_int(every, "every")
        self.power_iters = positive_int(power_iters, "power_iters")
        self.block_size = positive_int(block_size, "block_size")
        self.warmup_iters = positive_int(warmup_iters, "warmup_iters")
        self.full_every = positive_int(full_every, "full_every", allow_none=True)
        self.flush_every = positive_int(flush_every, "flush_every")
        if mode not in ("fast", "full"):
            raise ValueError(f"mode must be 'fast' or 'full', got {mode!r}")
        if mode == "full" and full_every is not None:
            raise ValueError(f"full_every={full_every!r} is for mode='fast'; in mode='full' every={every} sets the cadence")
        self.mode = mode
        self.metrics = self._resolve_metrics(metrics)
        # Fast mode asked only for full-spectrum metrics computes them on their cadence alone.
        self._fast_wanted = mode == "fast" and any(m in FAST_METRICS for m in self.metrics)
        selected = find_targets(
            model, target_modules, exclude_modules=exclude_modules, kinds=kinds,
            include_embeddings=include_embeddings, include_head=include_head,
        )
        if not selected:
            names = [name for name, module in model.named_modules() if name and get_view(module) is not None]
            raise ValueError(
                f"target_modules={target_modules!r} (exclude_modules={exclude_modules!r}, kinds={kinds!r}) select no layer of "
                f"{type(model).__name__}; layers with a weight view: {names[:12]}{' ...' if len(names) > 12 else ''}"
            )
        self.layer_names = [name for name, _ in selected]
        self._modules = [module for _, module in selected]
        self.seed = int(seed)
        self.sinks = list(sinks)
        for sink in self.sinks:
            if not isinstance(sink, Sink):
                raise TypeError(f"sinks must have write/flush/close methods, got {type(sink).__name__}")
        self._history = TrackerHistory(self.layer_names, self.metrics)
        self._step = 0
        self._last_recorded: int | None = None
        self._pending: list[tuple] = []
        self._spectra = LayerSpectra(
            self.layer_names, self._modules, power_iters=self.power_iters, warmup_iters=self.warmup_iters,
            block_size=self.block_size, seed=self.seed,
        )
        self._hook = None
        self._closed = False

    # -- configuration -------------------------------------------------------------------------
    def _resolve_metrics(self, metrics: Sequence[str] | None) -> tuple[str, ...]:
        if metrics is None:
            if self.mode == "full" or self.full_every is not None:
                return METRICS
            return FAST_METRICS
        if isinstance(metrics, str):
            metrics = (metrics,)
        metrics = tuple(metrics)
        if not metrics:
            raise ValueError("metrics must name at least one metric")
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; known: {list(METRICS)}")
        if len(set(metrics)) != len(metrics):
            raise ValueError(f"metrics {list(metrics)} name a metric twice")
        slow = [m for m in metrics if m in FULL_SPECTRUM_METRICS]
        if self.mode == "fast" and slow and self.full_every is None:
            raise ValueError(
                f"metrics {slow} need every singular value, which mode='fast' does not compute "
                f"(it gives {list(FAST_METRICS)}); use mode='full', or pass full_every=K to compute "
                "them from the full spectrum every K steps"
            )
        return metrics

    @property
    def step_count(self) -> int:
        """The current step (calls to :meth:`step`, or the last step passed in)."""
        return self._step

    def __repr__(self) -> str:
        cadence = f"every={self.every}" + (f", full_every={self.full_every}" if self.full_every else "")
        return f"SpectralTracker({len(self.layer_names)} layers, mode={self.mode!r}, {cadence}, metrics={list(self.metrics)})"

    def _compute(self, step: int, fast: bool, full: bool) -> None:
        if self._closed:
            raise RuntimeError("this SpectralTracker is closed")
        spectra = self._spectra
        spectra.refresh()
        fast_values = spectra.fast() if fast else None
        full_values = spectra.full() if full else None
        self._pending.append((step, fast_values, spectra.bucket_order, full_values, spectra.group_order))
        self._last_recorded = step
        if len(self._pending) >= self.flush_every:
            self.flush()

    # -- public driving API --------------------------------------------------------------------
    def step(self, step: int | None = None) -> bool:
        """Advance the step counter (or set it to ``step``) and record if this step is due.

        Parameters
        ----------
        step : int, optional
            The optimizer's step count after the step just taken (e.g. a Trainer's
            ``global_step``); by default the counter goes up by one.

        Returns
        -------
        bool
            Whether anything was computed at this step.
        """
        self._step = self._step + 1 if step is None else int(step)
        s = self._step
        due = s % self.every == 0
        if self.mode == "full":
            fast, full = False, due
        else:
            fast, full = due and self._fast_wanted, self.full_every is not None and s % self.full_every == 0
        if not (fast or full) or s == self._last_recorded:
            return False
        # Fast mode also iterates at a full step, so the warm start carries on.
        self._compute(s, fast or (full and self._fast_wanted), full)
        return True

    def record(self, step: int | None = None) -> None:
        """Record now, whatever the cadence (e.g. step 0, before training).

        Fast mode computes its fast metrics, plus the full spectrum when ``full_every`` is set;
        full mode computes the full spectrum.
        """
        if step is not None:
            self._step = int(step)
        self._compute(self._step, self._fast_wanted, self.mode == "full" or self.full_every is not None)

    def flush(self) -> None:
        """Move pending records to the host and write them to the history and the sinks."""
        pending, self._pending = self._pending, []
        if pending:
            steps = [record[0] for record in pending]
            rows = np.full((len(pending), len(self.layer_names), len(self.metrics)), np.nan)
            self._fill_fast(pending, rows)
            self._fill_full(pending, rows)
            self._history._extend(steps, rows)
            for sink in self.sinks:
                for step, row in zip(steps, rows):
                    sink.write(step, self.layer_names, self.metrics, row)
        for sink in self.sinks:
            sink.flush()
        self._spectra.restart_nonfinite()

    def _fill_fast(self, pending: list[tuple], rows: np.ndarray) -> None:
        """Write sigma_max, Frobenius norm and stable rank of the fast records into ``rows``."""
        columns = [(j, FAST_METRICS.index(m)) for j, m in enumerate(self.metrics) if m in FAST_METRICS]
        picked = [(r, record) for r, record in enumerate(pending) if record[1] is not None]
        if not picked or not columns:
            return
        # One transfer per flush: every estimate and norm, record-major then bucket by bucket.
        ritz = host([e for _, record in picked for e, _ in record[1]])
        frobs = host([f for _, record in picked for _, f in record[1]])
        zero = frobs == 0  # a zero matrix: sigma 0, whatever rounding left in the Ritz value
        sigma = np.where(zero, 0.0, np.sqrt(np.maximum(ritz, 0.0)))
        with np.errstate(divide="ignore", invalid="ignore"):
            stable = np.where(zero, 0.0, np.square(frobs / sigma))
        values = np.stack([sigma, frobs, stable], axis=1)
        n_layers = len(self.layer_names)
        for i, (r, record) in enumerate(picked):
            block = values[i * n_layers : (i + 1) * n_layers]
            for j, k in columns:
                rows[r, record[2], j] = block[:, k]

    def _fill_full(self, pending: list[tuple], rows: np.ndarray) -> None:
        """Write the full-spectrum records into ``rows`` (overriding fast estimates)."""
        picked = [(r, record) for r, record in enumerate(pending) if record[3] is not None]
        if not picked:
            return
        values = host([v for _, record in picked for v in record[3]])
        n_layers = len(self.layer_names)
        for i, (r, record) in enumerate(picked):
            block = values[i * n_layers : (i + 1) * n_layers]
            for j, metric in enumerate(self.metrics):
                rows[r, record[4], j] = block[:, METRICS.index(metric)]

    @property
    def history(self) -> TrackerHistory:
        """Every record so far (flushes pending records first)."""
        self.flush()
        return self._history

    # -- attaching -----------------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer, *, record_initial: bool = True) -> "SpectralTracker":
        """Call :meth:`step` after every ``optimizer.step()`` (a post-step hook).

        Parameters
        ----------
        optimizer : torch.optim.Optimizer
        record_initial : bool
            Record the current weights now (as the current step, 0 for a new tracker).

        Returns
        -------
        SpectralTracker
            ``self``, so ``tracker = SpectralTracker(model).attach(opt)`` works; usable as a
            context manager that detaches and closes on exit.
        """
        if self._hook is not None:
            raise RuntimeError("this tracker is already attached to an optimizer; call detach() first")
        if not hasattr(optimizer, "register_step_post_hook"):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if record_initial and self._last_recorded is None:
            self.record()
        self._hook = optimizer.register_step_post_hook(lambda opt, args, kwargs: self.step())
        return self

    def detach(self) -> None:
        """Remove the optimizer hook (if any) and flush; the tracker stays usable."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.flush()

    @property
    def attached(self) -> bool:
        """Whether an optimizer hook is registered."""
        return self._hook is not None

    def train_begin(self, step: int = 0) -> None:
        """Record the starting point as ``step``, unless something is recorded already.

        Called by :func:`~svdkit.analysis.training.trainer_callback` when training begins, so a
        tracker attached with :meth:`attach` (which records at once) is not recorded twice.
        """
        if self._last_recorded is None:
            self.record(step)

    def pre_optimizer_step(self, step: int) -> None:
        """Nothing to do before an update: the tracker reads weights, not gradients."""

    def trainer_callback(self):
        """A transformers ``TrainerCallback`` that drives this tracker (see :func:`trainer_callback`)."""
        return trainer_callback(self)

    def close(self) -> None:
        """Detach, flush and close the sinks; the history stays readable."""
        if self._closed:
            return
        self.detach()
        for sink in self.sinks:
            sink.close()
        self._closed = True

    def __enter__(self) -> "SpectralTracker":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
