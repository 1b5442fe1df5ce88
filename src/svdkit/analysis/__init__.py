"""Diagnose a network through spectra: weights, activations and the training trajectory."""

from .training import (
    CSVSink,
    SpectralTracker,
    TensorBoardSink,
    TrackerHistory,
    TrajectoryAnalysis,
    TrajectoryRecorder,
    trainer_callback,
)

__all__ = [
    "CSVSink",
    "SpectralTracker",
    "TensorBoardSink",
    "TrackerHistory",
    "TrajectoryAnalysis",
    "TrajectoryRecorder",
    "trainer_callback",
]
