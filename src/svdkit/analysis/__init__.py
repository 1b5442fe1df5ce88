"""Diagnose a network through spectra: weights, activations and the training trajectory."""

from .activations import NonFiniteData, analyze_activations, compare_activations
from .covariance import CovarianceAccumulator, linear_cka
from .marchenko_pastur import MPFit, fit_marchenko_pastur
from .powerlaw import PowerLawFit, fit_power_law
from .table import AnalysisTable
from .weights import analyze_weights
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
    "AnalysisTable",
    "NonFiniteData",
    "CovarianceAccumulator",
    "MPFit",
    "PowerLawFit",
    "analyze_activations",
    "analyze_weights",
    "compare_activations",
    "fit_marchenko_pastur",
    "fit_power_law",
    "linear_cka",
    "CSVSink",
    "SpectralTracker",
    "TensorBoardSink",
    "TrackerHistory",
    "TrajectoryAnalysis",
    "TrajectoryRecorder",
    "trainer_callback",
]
