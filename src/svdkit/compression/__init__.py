"""Low-rank compression: one per-layer compressor, two pipelines that drive it, save/load.

See ``docs/architecture.md`` for how data travels; the public entry points are
:func:`compress`, :func:`compress_sweep`, :func:`compress_to_directory` and the registries
(:func:`register_method`, :func:`register_curvature`).
"""

from .config import CompressConfig
from .curvature import CURVATURES, register_curvature
from .methods import METHODS, Factorization, Method, register_method
from .io import decompress, load_compressed, save_compressed
from .pipeline import compress, compress_sweep
from .streaming import compress_to_directory
from .quality import embedding_agreement
from .report import CompressionReport, LayerReport
from .statistics import LayerStats

__all__ = [
    "CURVATURES",
    "METHODS",
    "CompressConfig",
    "CompressionReport",
    "Factorization",
    "LayerReport",
    "LayerStats",
    "Method",
    "compress",
    "compress_sweep",
    "compress_to_directory",
    "decompress",
    "embedding_agreement",
    "load_compressed",
    "register_curvature",
    "register_method",
    "save_compressed",
]
