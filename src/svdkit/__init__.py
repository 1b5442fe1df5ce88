"""svdkit: the singular value decomposition at work on deep networks.

The main verbs and types are available from the top level and imported on first use, so
``import svdkit`` stays cheap::

    import svdkit
    small, report = svdkit.compress(model, svdkit.CompressConfig(budget=0.8), calibration)
    svdkit.save_compressed(small, "out/")

=====================================  ============================================
compress                               :func:`svdkit.compression.compress`
CompressConfig, CompressionReport      :mod:`svdkit.compression`
save_compressed, load_compressed,      :mod:`svdkit.compression.io`
decompress
add_lora, LoRAConfig, extract_lora     :mod:`svdkit.lora`
analyze_weights, analyze_activations   :mod:`svdkit.analysis`
load_model                             :mod:`svdkit.models`
perplexity                             :mod:`svdkit.eval`
Energy, ErrorTol, ParamRatio,          :mod:`svdkit.linalg` (the rank vocabulary)
RankRatio, resolve_rank
=====================================  ============================================
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "compress": "svdkit.compression",
    "CompressConfig": "svdkit.compression",
    "CompressionReport": "svdkit.compression",
    "save_compressed": "svdkit.compression",
    "load_compressed": "svdkit.compression",
    "decompress": "svdkit.compression",
    "add_lora": "svdkit.lora",
    "LoRAConfig": "svdkit.lora",
    "extract_lora": "svdkit.lora",
    "analyze_weights": "svdkit.analysis",
    "analyze_activations": "svdkit.analysis",
    "load_model": "svdkit.models",
    "perplexity": "svdkit.eval",
    "Energy": "svdkit.linalg",
    "ErrorTol": "svdkit.linalg",
    "ParamRatio": "svdkit.linalg",
    "RankRatio": "svdkit.linalg",
    "resolve_rank": "svdkit.linalg",
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'svdkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
