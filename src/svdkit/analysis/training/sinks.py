"""Where a :class:`~svdkit.analysis.training.SpectralTracker` writes its values.

A sink receives one record at a time: a step, the layer names, the metric names and a
float64 array of shape (n_layers, n_metrics), with NaN where a metric was not computed at that
step (fast mode computes the full-spectrum metrics only every ``full_every`` steps). Three sinks
ship: :class:`TrackerHistory` (in memory, always present as ``tracker.history``),
:class:`CSVSink` and :class:`TensorBoardSink` (optional dependency, imported lazily).

The CSV layout is one row per (step, layer), one column per metric, an empty cell for a value
not computed at that step::

    step,layer,sigma_max,frobenius_norm,stable_rank
    0,conv1,1.234,2.345,3.611
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import IO, Protocol, Sequence, runtime_checkable

import numpy as np

from ...exports import json_text, pandas

__all__ = ["CSVSink", "Sink", "TensorBoardSink", "TrackerHistory", "read_tracker_csv"]

PathLike = str | os.PathLike


@runtime_checkable
class Sink(Protocol):
    """What a tracker needs from a destination for its records."""

    def write(self, step: int, layers: Sequence[str], metrics: Sequence[str], values: np.ndarray) -> None:
        """Take one record; ``values`` has shape (len(layers), len(metrics)), NaN where not computed."""

    def flush(self) -> None:
        """Push buffered records to their destination."""

    def close(self) -> None:
        """Flush and release resources; further writes are an error."""


def _check_record(layers: Sequence[str], metrics: Sequence[str], values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (len(layers), len(metrics)):
        raise ValueError(
            f"values must have shape (n_layers, n_metrics) = ({len(layers)}, {len(metrics)}), got {values.shape}"
        )
    return values


class TrackerHistory:
    """The in-memory record of a tracker: steps x layers x metrics.

    Attributes
    ----------
    layers : list of str
        Layer names, in model order.
    metrics : list of str
        Metric names, in the tracker's order.

    Notes
    -----
    Grows by ``n_layers * n_metrics * 8`` bytes per record.
    """

    def __init__(self, layers: Sequence[str] = (), metrics: Sequence[str] = ()) -> None:
        self.layers: list[str] = list(layers)
        self.metrics: list[str] = list(metrics)
        self._steps: list[int] = []
        self._values: list[np.ndarray] = []

    # -- the Sink protocol -------------------------------------------------------------------
    def write(self, step: int, layers: Sequence[str], metrics: Sequence[str], values: np.ndarray) -> None:
        """Append one record (see :class:`Sink`)."""
        values = _check_record(layers, metrics, values)
        if not self.layers and not self.metrics and not self._steps:
            self.layers, self.metrics = list(layers), list(metrics)
        elif list(layers) != self.layers or list(metrics) != self.metrics:
            raise ValueError("a TrackerHistory takes records of one set of layers and metrics")
        self._steps.append(int(step))
        self._values.append(values.copy())

    def _extend(self, steps: Sequence[int], values: np.ndarray) -> None:
        """Append records of this history's layers and metrics, ``values`` of shape (n, n_layers, n_metrics)."""
        if values.shape[1:] != (len(self.layers), len(self.metrics)):
            raise ValueError(f"values must have shape (n, {len(self.layers)}, {len(self.metrics)}), got {values.shape}")
        self._steps.extend(int(step) for step in steps)
        self._values.extend(np.array(values, dtype=np.float64))

    def flush(self) -> None:
        """Nothing to do: the history is in memory."""

    def close(self) -> None:
        """Nothing to release: the history stays readable."""

    # -- reading -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._steps)

    def __repr__(self) -> str:
        return f"TrackerHistory({len(self)} records, {len(self.layers)} layers, metrics={self.metrics})"

    @property
    def steps(self) -> np.ndarray:
        """Steps of the records, int64 array of shape (n_records,)."""
        return np.asarray(self._steps, dtype=np.int64)

    def array(self) -> np.ndarray:
        """All values, float64 array of shape (n_records, n_layers, n_metrics), NaN where not computed."""
        if not self._values:
            return np.zeros((0, len(self.layers), len(self.metrics)))
        return np.stack(self._values)

    def values(self, metric: str) -> np.ndarray:
        """One metric for every layer, float64 array of shape (n_records, n_layers)."""
        return self.array()[:, :, self._metric_index(metric)]

    def series(self, layer: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """One layer's metric against step, without the steps where it was not computed.

        Returns
        -------
        steps : int64 array of shape (n,)
        values : float64 array of shape (n,)
        """
        if layer not in self.layers:
            raise KeyError(f"no layer {layer!r} in the history; layers: {self.layers}")
        column = self.values(metric)[:, self.layers.index(layer)]
        kept = ~np.isnan(column)
        return self.steps[kept], column[kept]

    def last(self) -> dict[str, dict[str, float]]:
        """The latest computed value of each metric, ``{layer: {metric: value}}``."""
        out: dict[str, dict[str, float]] = {layer: {} for layer in self.layers}
        for layer in self.layers:
            for metric in self.metrics:
                _, values = self.series(layer, metric)
                if len(values):
                    out[layer][metric] = float(values[-1])
        return out

    def _metric_index(self, metric: str) -> int:
        if metric not in self.metrics:
            raise KeyError(f"no metric {metric!r} in the history; metrics: {self.metrics}")
        return self.metrics.index(metric)

    def to_rows(self) -> list[dict[str, float | int | str]]:
        """One dict per (step, layer) with a key per computed metric."""
        rows: list[dict[str, float | int | str]] = []
        for step, values in zip(self._steps, self._values):
            for i, layer in enumerate(self.layers):
                row: dict[str, float | int | str] = {"step": step, "layer": layer}
                row.update({m: float(v) for m, v in zip(self.metrics, values[i]) if not math.isnan(v)})
                rows.append(row)
        return rows

    def to_dict(self) -> dict:
        """JSON-ready dict: ``layers``, ``metrics``, and ``rows`` (one per step and layer, NaN left out)."""
        return {"layers": list(self.layers), "metrics": list(self.metrics), "rows": self.to_rows()}

    def to_json(self, path: PathLike | None = None, *, indent: int = 2) -> str:
        """JSON text of :meth:`to_dict`; written to ``path`` when given."""
        return json_text(self.to_dict(), path, indent=indent)

    def to_pandas(self):
        """A ``pandas.DataFrame`` with columns ``step, layer, *metrics`` (NaN where not computed).

        Raises
        ------
        ImportError
            Without pandas.
        """
        pd = pandas()
        return pd.DataFrame.from_records(self.to_rows(), columns=["step", "layer", *self.metrics])

    def to_table(self) -> str:
        """The latest value of each metric per layer, as aligned plain text."""
        last = self.last()
        head = ["layer", *self.metrics]
        rows = [[layer, *(f"{last[layer][m]:.4g}" if m in last[layer] else "-" for m in self.metrics)] for layer in self.layers]
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]
        step = f"step {self._steps[-1]}" if self._steps else "no records"
        lines = [f"{len(self)} records, latest values ({step})"]
        lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in [head, *rows]]
        return "\n".join(lines)

    def to_csv(self, path: PathLike) -> Path:
        """Write the whole history in the CSV layout of this module; returns the path."""
        path = Path(path)
        sink = CSVSink(path)
        for step, values in zip(self._steps, self._values):
            sink.write(step, self.layers, self.metrics, values)
        sink.close()
        return path

    @classmethod
    def from_csv(cls, path: PathLike) -> "TrackerHistory":
        """Read a CSV written by :class:`CSVSink` or :meth:`to_csv`."""
        return read_tracker_csv(path)


def read_tracker_csv(path: PathLike) -> TrackerHistory:
    """Load a tracker CSV (``step,layer,<metric>...``) into a :class:`TrackerHistory`.

    Raises
    ------
    ValueError
        If the header does not start with ``step,layer`` or a step lacks a layer.
    """
    path = Path(path)
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or header[:2] != ["step", "layer"] or len(header) < 3:
            raise ValueError(f"{path} is not a tracker CSV: its header is {header!r}, expected step,layer,<metric>...")
        metrics = header[2:]
        by_step: dict[int, dict[str, list[float]]] = {}
        layers: list[str] = []
        for row in reader:
            if not row:
                continue
            step, layer = int(row[0]), row[1]
            if layer not in layers:
                layers.append(layer)
            by_step.setdefault(step, {})[layer] = [float(x) if x != "" else math.nan for x in row[2:]]
    history = TrackerHistory(layers, metrics)
    for step in sorted(by_step):
        record = by_step[step]
        missing = [layer for layer in layers if layer not in record]
        if missing:
            raise ValueError(f"{path}: step {step} has no row for layers {missing}")
        history.write(step, layers, metrics, np.array([record[layer] for layer in layers]))
    return history


class CSVSink:
    """Append records to a CSV file (layout in this module's docstring).

    Parameters
    ----------
    path : str or PathLike
        Created (with its parent folder) on the first write; an existing file is overwritten.
    flush_every : int
        Records between flushes to disk; :meth:`flush` and :meth:`close` always flush.
    """

    def __init__(self, path: PathLike, *, flush_every: int = 1) -> None:
        if isinstance(flush_every, bool) or not isinstance(flush_every, int) or flush_every < 1:
            raise ValueError(f"flush_every must be an int >= 1, got {flush_every!r}")
        self.path = Path(path)
        self.flush_every = flush_every
        self._handle: IO[str] | None = None
        self._writer = None
        self._columns: tuple[list[str], list[str]] | None = None
        self._pending = 0
        self._closed = False

    def write(self, step: int, layers: Sequence[str], metrics: Sequence[str], values: np.ndarray) -> None:
        """Append one record as ``len(layers)`` rows."""
        if self._closed:
            raise ValueError(f"CSVSink({str(self.path)!r}) is closed")
        values = _check_record(layers, metrics, values)
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = self.path.open("w", newline="")
            self._writer = csv.writer(self._handle)
            self._writer.writerow(["step", "layer", *metrics])
            self._columns = (list(layers), list(metrics))
        elif self._columns != (list(layers), list(metrics)):
            raise ValueError(f"CSVSink({str(self.path)!r}) takes records of one set of layers and metrics")
        for layer, row in zip(layers, values):
            self._writer.writerow([int(step), layer, *("" if math.isnan(v) else repr(float(v)) for v in row)])
        self._pending += 1
        if self._pending >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Flush the file."""
        if self._handle is not None:
            self._handle.flush()
        self._pending = 0

    def close(self) -> None:
        """Flush and close the file."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        self._closed = True

    def __repr__(self) -> str:
        return f"CSVSink({str(self.path)!r})"


class TensorBoardSink:
    """Log every value as a TensorBoard scalar, tagged ``{prefix}/{metric}/{layer}``.

    Parameters
    ----------
    log_dir : str or PathLike, optional
        Folder for a new ``SummaryWriter``; ignored when ``writer`` is given.
    writer : torch.utils.tensorboard.SummaryWriter, optional
        An existing writer (the sink then does not close it).
    prefix : str
        First part of every tag.

    Raises
    ------
    ImportError
        If the ``tensorboard`` package is not installed (``pip install 'svdkit[tensorboard]'``).
    """

    def __init__(self, log_dir: PathLike | None = None, *, writer=None, prefix: str = "spectral") -> None:
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ImportError(
                    "TensorBoardSink needs the tensorboard package: pip install tensorboard "
                    "(or pip install 'svdkit[tensorboard]')"
                ) from exc
            writer = SummaryWriter(log_dir=None if log_dir is None else str(log_dir))
            self._owns_writer = True
        else:
            self._owns_writer = False
        self.writer = writer
        self.prefix = prefix

    def write(self, step: int, layers: Sequence[str], metrics: Sequence[str], values: np.ndarray) -> None:
        """Add one scalar per computed (layer, metric)."""
        values = _check_record(layers, metrics, values)
        for layer, row in zip(layers, values):
            for metric, value in zip(metrics, row):
                if not math.isnan(value):
                    self.writer.add_scalar(f"{self.prefix}/{metric}/{layer}", float(value), int(step))

    def flush(self) -> None:
        """Flush the event file."""
        self.writer.flush()

    def close(self) -> None:
        """Flush; close the writer if this sink created it."""
        self.writer.flush()
        if self._owns_writer:
            self.writer.close()

    def __repr__(self) -> str:
        return f"TensorBoardSink(log_dir={getattr(self.writer, 'log_dir', None)!r})"
