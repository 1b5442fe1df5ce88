"""Whole-model SVD compression: config, methods, rank allocation, report, save/load."""

from .config import CompressConfig
from .methods import METHODS, Factorization, register_method
from .io import decompress, load_compressed, save_compressed
from .pipeline import compress, compress_sweep
from .streaming import compress_to_directory
from .quality import embedding_agreement
from .report import CompressionReport, LayerReport
from .stats import LayerStats, collect_layer_stats

__all__ = [
    "METHODS",
    "CompressConfig",
    "CompressionReport",
    "Factorization",
    "LayerReport",
    "LayerStats",
    "collect_layer_stats",
    "compress",
    "compress_sweep",
    "compress_to_directory",
    "decompress",
    "embedding_agreement",
    "load_compressed",
    "register_method",
    "save_compressed",
]
