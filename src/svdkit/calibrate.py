"""Stream per-layer Gram statistics from calibration data through hooks.

For each target layer the hooks accumulate a :class:`GramStats` over every vector they see:

- :class:`InputRecorder`: the layer's input vectors ``x`` (tokens of a sequence, patches of a
  convolution: its kind's ``input_rows``, :mod:`svdkit.views`): ``G = sum x x^T`` and ``sum |x|``;
- :class:`GradientRecorder`: the gradients ``g`` of an objective at the layer's output vectors:
  ``sum g g^T``.

Grams are float64, shape (d, d); memory grows with the layers' widths, never with the number of
tokens. Padding tokens are left out when the batch carries an attention mask (a dict batch with
``attention_mask``, or any forward that wraps its call in :func:`svdkit.batches.token_mask`).
Hooks are removed on exit. Batches run through :mod:`svdkit.batches`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .batches import BatchRunner, NonFiniteData, current_row_weights, current_token_mask, token_mask
from .linalg import cholesky_factor
from .progress import ProgressLike, track
from .views import WeightView, get_view, kinds

__all__ = [
    "GradientRecorder",
    "GramStats",
    "InputRecorder",
    "check_finite",
    "collect_input_stats",
    "layer_inputs",
    "layer_outputs",
    "symmetric_blocks",
]

GRAM_CHUNK = 4096
"""Rows per float32 product when :meth:`GramStats.update` accumulates narrow input."""


@dataclass
class GramStats:
    """Streamed Gram statistics of one stream of vectors (a layer's inputs, or the gradients at
    its outputs).

    Attributes
    ----------
    gram : Tensor of shape (d, d), float64
        ``sum x x^T`` over all vectors.
    abs_sum : Tensor of shape (d,), float64
        ``sum |x|`` per feature.
    count : int
        Number of vectors seen.
    """

    gram: torch.Tensor
    abs_sum: torch.Tensor
    count: int = 0
    _whitening: dict[float, tuple[torch.Tensor, float]] = field(default_factory=dict, repr=False, compare=False)

    def whitening(self, damping: float) -> tuple[torch.Tensor, float]:
        """The Cholesky factor of the mean Gram ``gram / count`` with relative ``damping``
        (:func:`svdkit.linalg.cholesky_factor`), computed once per damping and kept with the
        statistics (layers that share statistics share it, and it travels when they are saved).

        Returns
        -------
        L : Tensor of shape (d, d), float64
        damping : float
            The damping that worked.
        """
        if damping not in self._whitening:
            self._whitening[damping] = cholesky_factor(self.gram / max(self.count, 1), damping=damping)
        return self._whitening[damping]

    @classmethod
    def zeros(cls, dim: int, device: torch.device | str = "cpu") -> "GramStats":
        """Empty statistics for inputs of width ``dim``."""
        return cls(
            torch.zeros(dim, dim, dtype=torch.float64, device=device),
            torch.zeros(dim, dtype=torch.float64, device=device),
        )

    def update(self, X: torch.Tensor) -> None:
        """Add input vectors ``X`` of shape (N, d).

        Notes
        -----
        Float64 input is accumulated in float64. Narrower input (float32, float16, bfloat16)
        is multiplied in float32, :data:`GRAM_CHUNK` rows at a time, and each chunk's product is
        added to the float64 accumulator: a float32 product of ``c`` rows errs by at most about
        ``c * 2**-24`` relative to ``sum |x_i| |x_j|`` (typically ``sqrt(c) * 2**-24``, ~2e-6 for
        ``c = 4096``), and errors of different chunks do not compound in the float64 sum. That is
        below both the float32 rounding of the activations themselves and the relative damping
        (1e-6) that whitening adds before its Cholesky factorization, at 2-4x the speed of a
        float64 product on CPUs. Wide inputs are multiplied by column blocks (the blocks on and
        above the diagonal, mirrored; :func:`symmetric_blocks`): from three quarters of the
        arithmetic (two blocks) toward half.
        """
        self._whitening.clear()
        X = X.detach()
        if X.dtype == torch.float64:
            self.gram.addmm_(X.T.to(self.gram.device), X.to(self.gram.device))
            self.abs_sum += X.abs().sum(dim=0).to(self.abs_sum.device)
        else:
            X = X.to(torch.float32)
            for chunk in X.split(GRAM_CHUNK):
                _add_symmetric_product(self.gram, chunk)
                self.abs_sum += chunk.abs().sum(dim=0).to(self.abs_sum.device, torch.float64)
        self.count += X.shape[0]

    def merge(self, other: "GramStats") -> "GramStats":
        """Statistics of both streams together (in place; returns self)."""
        self._whitening.clear()
        self.gram += other.gram.to(self.gram.device)
        self.abs_sum += other.abs_sum.to(self.abs_sum.device)
        self.count += other.count
        return self

    @property
    def abs_mean(self) -> torch.Tensor:
        """Mean ``|x|`` per input feature, shape (d,)."""
        return self.abs_sum / max(self.count, 1)


SYMMETRIC_SPLIT_WIDTH = 384
"""From this width on, :meth:`GramStats.update` computes a Gram's upper blocks only."""

SYMMETRIC_BLOCK_WIDTH = 384
"""The narrowest column block of a split Gram past two blocks: a 1536-wide Gram is computed in four
blocks of 384 columns (10 of the 16 products: 21.9 ms against 26.5 ms by halves for 1,024 rows on two
AVX-512 cores); narrower blocks make products too thin to run faster."""


def symmetric_blocks(width: int) -> list[int]:
    """Where :func:`_add_symmetric_product` splits the columns of a ``width``-wide input: the block
    edges, from 0 to ``width`` (one block below :data:`SYMMETRIC_SPLIT_WIDTH`, then two, then as
    many as keep every block at least :data:`SYMMETRIC_BLOCK_WIDTH` wide)."""
    if width < SYMMETRIC_SPLIT_WIDTH:
        return [0, width]
    count = max(2, width // SYMMETRIC_BLOCK_WIDTH)
    return [width * i // count for i in range(count + 1)]


def _add_symmetric_product(gram: torch.Tensor, X: torch.Tensor) -> None:
    """``gram += X^T X`` for float32 ``X`` of shape (N, d) into float64 ``gram`` (d, d), by the
    column blocks of :func:`symmetric_blocks`: each block's product with itself and with the
    blocks after it, the blocks below the diagonal mirrored (``k`` blocks: ``(k + 1) / 2k`` of the
    arithmetic of the whole product)."""
    edges = symmetric_blocks(X.shape[1])
    spans = [slice(a, b) for a, b in zip(edges, edges[1:])]
    for i, rows in enumerate(spans):
        left = X[:, rows]
        for cols in spans[i:]:
            product = (left.T @ X[:, cols]).to(gram.device, torch.float64)
            gram[rows, cols] += product
            if cols != rows:
                gram[cols, rows] += product.T


def layer_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input vectors a layer applies its weight matrix to, shape (N, d): its kind's
    ``input_rows`` (:mod:`svdkit.views`), with the current :func:`token_mask` applied.

    Parameters
    ----------
    module : nn.Module
        A layer of a calibrated kind (Linear, transformers Conv1D, Conv2d, or a registered one).
    x : Tensor
        The layer's input: (..., d) for Linear/Conv1D, (B, C, H, W) for Conv2d.
    """
    return _calibrated_view(module).input_rows(module, x, current_token_mask())


def layer_outputs(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The output vectors of a layer (where output gradients are recorded), shape (N, d_out),
    with the current :func:`token_mask` applied."""
    return _calibrated_view(module).rows_of_output(module, y, current_token_mask())


def _calibrated_view(module: nn.Module) -> WeightView:
    view = get_view(module)
    if view is None or not view.calibrated:
        raise TypeError(f"{type(module).__name__} is not a layer applied to input vectors; calibrated kinds: {', '.join(kinds(lambda v: v.calibrated))}")
    return view


def check_finite(stats: "GramStats", name: str, what: str, batch: int | None) -> None:
    """Raise :class:`NonFiniteData` (naming the batch, the layer and what was recorded) when the
    statistics hold NaN or infinite values."""
    # A NaN or infinite entry of a row x makes its own diagonal entry sum x_i**2 NaN or infinite,
    # so the d diagonal entries of the Gram tell for all d**2 of them.
    if not bool(torch.isfinite(stats.gram.diagonal()).all()):
        where = f"calibration batch {batch}" if batch is not None else "a calibration batch"
        raise NonFiniteData(
            f"{where}: the {what} of layer {name} holds NaN or infinite values (the first target layer they reach); "
            "check that batch's data, or the model's weights upstream of that layer"
        )


def _check_input_width(module: nn.Module, x: torch.Tensor, name: str, batch: int | None) -> None:
    """Refuse an input the layer cannot take, naming the batch and the layer (the layer itself
    would fail with a bare shape error, after the statistics were already corrupted)."""
    where = f"calibration batch {batch}" if batch is not None else "a calibration batch"
    view = _calibrated_view(module)
    axis, width = view.input_axis, view.width(module)
    if x.ndim < -axis or x.shape[axis] != width:
        raise ValueError(
            f"{where} reaches layer {name!r} as a tensor of shape {tuple(x.shape)}, but the layer takes {width} input "
            f"features (axis {axis}): the data does not fit this model"
        )
    if not x.is_floating_point():
        raise ValueError(f"{where} reaches layer {name!r} as {x.dtype}, not a float tensor")


class InputRecorder:
    """Forward hooks that accumulate each target's input statistics while the model runs.

    Use as a context manager around forwards (hooks are removed on exit), and call
    :meth:`next_batch` before each batch: layers fed the same tensor in one batch (query, key and
    value) share one Gram update, and the batch index names the batch in errors.

    Parameters
    ----------
    targets : iterable of (name, module)
    weighted : bool
        Weigh each input row by the current :func:`row_weights` (a mixture's routing weights),
        so an expert's Gram is that of its inputs as they reach the layer's output.

    Attributes
    ----------
    stats : dict of name -> GramStats
    """

    def __init__(self, targets: Iterable[tuple[str, nn.Module]], *, weighted: bool = False) -> None:
        self.targets = list(targets)
        self.weighted = weighted
        for name, module in self.targets:
            view = get_view(module)
            if view is None or not view.calibrated:
                raise ValueError(
                    f"cannot calibrate {name} ({type(module).__name__}): only layers applied to input vectors "
                    f"(kinds {', '.join(kinds(lambda v: v.calibrated))})"
                )
        self.stats: dict[str, GramStats] = {}
        self.batch: int | None = None
        self._increments: dict[tuple, tuple[weakref.ref, GramStats, int]] = {}
        self._sources: dict[str, list[int]] = {}
        self._serial = 0
        self._handles: list = []

    def __enter__(self) -> "InputRecorder":
        self._handles = [module.register_forward_pre_hook(self._hook(name)) for name, module in self.targets]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._increments.clear()
        self._share_identical()

    def _share_identical(self) -> None:
        """Layers that received the very same inputs in every batch (query, key and value) end
        with equal statistics: let them hold one object (one Gram in memory, one whitening)."""
        first: dict[tuple[int, ...], str] = {}
        for name, sources in self._sources.items():
            owner = first.setdefault(tuple(sources), name)
            if owner != name:
                self.stats[name] = self.stats[owner]

    def next_batch(self, index: int | None = None) -> None:
        """Start a new batch (``index`` names it in errors)."""
        self._increments.clear()
        self.batch = index

    def _hook(self, name: str):
        def hook(module, inputs):
            x = inputs[0]
            key = (id(x), type(module), getattr(module, "kernel_size", None), getattr(module, "stride", None),
                   getattr(module, "padding", None), getattr(module, "dilation", None))
            cached = self._increments.get(key)
            # A weak reference tells a live shared input from a new tensor that reused a freed id.
            if cached is not None and cached[0]() is x:
                _, increment, serial = cached
            else:
                _check_input_width(module, x, name, self.batch)
                rows = layer_inputs(module, x)
                weights = current_row_weights() if self.weighted else None
                if weights is not None and weights.shape[0] == rows.shape[0]:
                    rows = rows * weights.to(rows.dtype).unsqueeze(1)
                increment = GramStats.zeros(rows.shape[1], device=rows.device)
                increment.update(rows)
                check_finite(increment, name, "input", self.batch)
                self._serial += 1
                serial = self._serial
                self._increments[key] = (weakref.ref(x), increment, serial)
            self._sources.setdefault(name, []).append(serial)
            if name not in self.stats:
                self.stats[name] = GramStats.zeros(increment.gram.shape[0], device=increment.gram.device)
            self.stats[name].merge(increment)
        return hook

    def check_reached(self, optional: Iterable[str] = ()) -> None:
        """Raise if some target never received an input, listing them (``optional``: targets that
        may go without, such as experts no calibration token was routed to)."""
        optional = set(optional)
        missing = [name for name, _ in self.targets if (name not in self.stats or self.stats[name].count == 0) and name not in optional]
        if missing:
            raise ValueError(
                f"the calibration data never reached {len(missing)} target layer(s): {', '.join(missing)}; "
                "exclude them or check the forward function"
            )


class GradientRecorder:
    """Forward hooks that accumulate the Gram of the gradient at each target's output.

    Inside the context, every floating-point output of a target that requires a gradient gets a
    tensor hook; when a backward pass reaches it, the rows of the gradient (tokens, or pixels of
    a convolution) are added to the target's statistics, with the token mask of the batch that
    produced the output.

    Attributes
    ----------
    stats : dict of name -> GramStats
        ``gram`` is ``sum g g^T`` over output vectors, shape (d_out, d_out).
    """

    def __init__(self, targets: Iterable[tuple[str, nn.Module]], *, make_leaves: bool = False) -> None:
        self.targets = list(targets)
        self.make_leaves = make_leaves
        self.stats: dict[str, GramStats] = {}
        self.batch: int | None = None
        self._handles: list = []

    def __enter__(self) -> "GradientRecorder":
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in self.targets]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def next_batch(self, index: int | None = None) -> None:
        self.batch = index

    def _hook(self, name: str):
        def record(module: nn.Module, grad: torch.Tensor, mask: torch.Tensor | None, batch: int | None) -> None:
            with token_mask(mask):
                rows = layer_outputs(module, grad)
            if name not in self.stats:
                self.stats[name] = GramStats.zeros(rows.shape[1], device=rows.device)
            self.stats[name].update(rows)
            # the sums stay finite until a batch brings a non-finite value, so this names that batch
            check_finite(self.stats[name], name, "output gradient", batch)

        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor) or not output.is_floating_point() or not torch.is_grad_enabled():
                return
            if not output.requires_grad:
                if not self.make_leaves:
                    return
                # Parameters are frozen, so the first target's output is a leaf: make it one
                # that asks for its gradient, and everything downstream follows.
                output.requires_grad_(True)
            # The token mask and index of this batch are bound now; the gradient arrives later.
            mask, batch = current_token_mask(), self.batch
            output.register_hook(lambda grad: record(module, grad, mask, batch))
        return hook


def collect_input_stats(
    model: nn.Module,
    targets: Iterable[tuple[str, nn.Module]],
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any] | None = None,
    *,
    progress: ProgressLike = None,
) -> dict[str, GramStats]:
    """Stream input statistics of ``targets`` over ``batches``.

    Parameters
    ----------
    model : nn.Module
    targets : iterable of (name, module)
        Linear, Conv1D or Conv2d layers inside ``model``.
    batches : iterable
        Calibration batches (see :func:`run_batch`).
    forward : callable, optional
        ``forward(module, batch) -> output`` runs ``module`` on one batch (svdkit's one forward
        contract; :meth:`svdkit.models.LoadedModel.forward` is one).
    progress : bool or callable, optional
        See :mod:`svdkit.progress`.

    Returns
    -------
    dict of name -> GramStats

    Raises
    ------
    NonFiniteData
        A batch made some target's input NaN or infinite (the message names the batch and the
        first such layer).
    ValueError
        If no batch was given or some target never received an input; the message lists them.
    """
    n_batches = 0
    with InputRecorder(targets) as recorder, BatchRunner(model, forward, what="calibration batch") as run, torch.no_grad():
        for index, batch in enumerate(track(batches, progress, desc="calibration batches")):
            recorder.next_batch(index)
            run(batch)
            n_batches += 1
    if n_batches == 0:
        raise ValueError("the calibration data held no batches")
    recorder.check_reached()
    return recorder.stats
