"""Training dynamics through the SVD.

- :class:`SpectralTracker`: per-layer ``sigma_max``, Frobenius norm, stable rank, nuclear norm,
  condition number and effective rank against the training step (fast power-iteration mode or
  full-spectrum mode), written to an in-memory :class:`TrackerHistory`, a CSV file
  (:class:`CSVSink`) or TensorBoard (:class:`TensorBoardSink`).
- :class:`TrajectoryRecorder`: parameter snapshots (exact or sketched, memory bounded) and the
  SVD of the step-to-step updates, with the overlap of each new gradient with the top-``k``
  update subspace (:class:`TrajectoryAnalysis`).
- :func:`trainer_callback`: both, driven by a transformers ``Trainer``.

Figures live in :mod:`svdkit.report.training_plots`.
"""

from .callbacks import trainer_callback
from .sinks import CSVSink, Sink, TensorBoardSink, TrackerHistory, read_tracker_csv
from .tracker import FAST_METRICS, FULL_SPECTRUM_METRICS, METRICS, SpectralTracker
from .trajectory import TrajectoryAnalysis, TrajectoryRecorder

__all__ = [
    "CSVSink",
    "FAST_METRICS",
    "FULL_SPECTRUM_METRICS",
    "METRICS",
    "Sink",
    "SpectralTracker",
    "TensorBoardSink",
    "TrackerHistory",
    "TrajectoryAnalysis",
    "TrajectoryRecorder",
    "read_tracker_csv",
    "trainer_callback",
]
