"""What a saved compressed model directory holds beside its weights, written in one place.

Both writers of compressed models, :func:`svdkit.compression.io.save_compressed` (one weight
file) and :func:`svdkit.compression.compress_to_directory` (one shard per block), finish their
directory with :func:`write_saved_files`:

- the transformers companions (``config.json``, ``generation_config.json``, the tokenizer);
- for a transformers model whose factorized layers are all ``LowRankLinear``, the export that
  plain transformers loads with ``trust_remote_code=True`` (:mod:`svdkit.export.remote_code`);
  a transformers model that cannot be exported says why, in a warning and in the description,
  and its weights are renamed (``svdkit_model.safetensors``, ``svdkit_model.safetensors.index.json``)
  so that plain transformers finds none and refuses the directory, instead of building the base
  model with random weights where the factors are;
- ``svdkit_compressed.json``, the description (see :mod:`svdkit.compression.io`);
- ``README.md``, the model card;

and gives every file and folder the permissions the umask gives.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .. import __version__
from ..export.card import model_card
from ..export.dtype import dtype_name
from ..export.modeling_lowrank import sha256
from ..export.remote_code import write_remote_code
from ..files import apply_umask, write_atomic
from .transformers_files import is_transformers_model, transformers_skeleton, write_companions

__all__ = [
    "CARD_NAME", "CONFIG_NAME", "FORMAT_VERSION", "INDEX_NAME", "READABLE_VERSIONS", "SVDKIT_ONLY_PREFIX", "WEIGHTS_NAME",
    "sha256", "write_saved_files",
]

FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
CONFIG_NAME = "svdkit_compressed.json"
CARD_NAME = "README.md"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# Weights plain transformers must not find (a model it cannot build): their names take this prefix.
SVDKIT_ONLY_PREFIX = "svdkit_"


def _hide_from_transformers(directory: Path, weight_files: Sequence[str]) -> list[str]:
    """Rename the files through which transformers would find weights (the single weight file,
    the shards' index) with :data:`SVDKIT_ONLY_PREFIX`; the weight files' new names."""
    renamed = []
    for name in weight_files:
        if name == WEIGHTS_NAME:
            os.replace(directory / name, directory / (SVDKIT_ONLY_PREFIX + name))
            name = SVDKIT_ONLY_PREFIX + name
        renamed.append(name)
    if (directory / INDEX_NAME).exists():
        os.replace(directory / INDEX_NAME, directory / (SVDKIT_ONLY_PREFIX + INDEX_NAME))
    return renamed


def write_saved_files(
    model: nn.Module,
    directory: Path,
    *,
    weight_files: Sequence[str],
    layers: Mapping[str, Any],
    dtype: torch.dtype | None,
    source: str | None = None,
    config: Any = None,
    report: Any = None,
    tokenizer: Any = None,
    target: Path | None = None,
    quantization: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write everything but the weights into ``directory`` (see the module docstring).

    Parameters
    ----------
    model : nn.Module
        The compressed model (its weights may be empty: only its structure and config are read).
    directory : Path
        Holds the weight files already.
    weight_files : sequence of str
        Their names; their SHA-256 are recorded.
    layers : mapping
        The factorized layers and their geometry (:func:`svdkit.compression.io.factorized_layers`).
    dtype : torch.dtype or None
        The dtype of the saved floating-point weights.
    source, config, report, tokenizer : optional
        The model spec of the original, the CompressConfig, the CompressionReport, a tokenizer.
    target : Path, optional
        Where ``directory`` will be moved when it is a staging directory: the name the warning
        and the model card give.
    quantization : mapping, optional
        The quantized weights' record (:func:`svdkit.quantization.record.quantization_record`).

    Returns
    -------
    dict
        The description written (its ``files`` name the weight files as they are now: renamed
        for a transformers model plain transformers cannot load).
    """
    name = dtype_name(dtype) if dtype is not None else None
    target = target or directory
    write_companions(model, directory, tokenizer, dtype=name)
    absent = _absent_modules(model, directory) if is_transformers_model(model) else []
    reason = write_remote_code(model, directory, layers, name, weight_files, quantization, absent)
    if reason is not None and is_transformers_model(model):
        weight_files = _hide_from_transformers(directory, weight_files)
        warnings.warn(f"saved {target} for svdkit only: plain transformers cannot load it, because {reason}", UserWarning, stacklevel=3)
    quality = dict(getattr(report, "quality", None) or {})
    meta = {
        "format_version": FORMAT_VERSION,
        "svdkit_version": __version__,
        "source": source,
        "config": config.to_dict() if hasattr(config, "to_dict") else config,
        "report": report.totals() if hasattr(report, "totals") else None,
        "quality": quality or None,
        "speed": dict(getattr(report, "speed", None) or {}) or None,
        "dtype": name,
        "transformers": _loading(directory) if reason is None else {"auto_class": None, "reason": reason},
        "layers": dict(layers),
        "absent_modules": absent or None,
        "quantization": dict(quantization) if quantization else None,
        "files": {file: sha256(directory / file) for file in weight_files},
    }
    text = json.dumps(meta, indent=2, default=str)
    write_atomic(directory / CONFIG_NAME, lambda t: t.write_text(text, encoding="utf-8"))
    card = model_card(target.name, json.loads(text), quality)
    write_atomic(directory / CARD_NAME, lambda t: t.write_text(card, encoding="utf-8"))
    apply_umask(directory)
    return meta


def _absent_modules(model: nn.Module, directory: Path) -> list[str]:
    """The modules that the model's class builds from ``config.json`` but this model was built
    without (``ViTModel(config, add_pooling_layer=False)`` sets ``pooler`` to None), so that
    loading builds the model as it was."""
    try:
        skeleton = transformers_skeleton(directory)
    except Exception:  # noqa: BLE001 - a class svdkit cannot build from its config (remote code): nothing to leave out
        return []
    present = {name for name, _ in model.named_modules()}
    absent: list[str] = []
    for name, _ in skeleton.named_modules():
        if name in present or any(name.startswith(a + ".") for a in absent):
            continue
        parent, _, attr = name.rpartition(".")
        if parent in present and getattr(model.get_submodule(parent), attr, 0) is None:
            absent.append(name)
    return absent


def _loading(directory: Path) -> dict[str, Any]:
    """How plain transformers loads an export: the Auto class of the model as saved, and the map."""
    auto_map = json.loads((directory / "config.json").read_text(encoding="utf-8"))["auto_map"]
    heads = [auto for auto in auto_map if auto not in ("AutoConfig", "AutoModel")]
    return {"auto_class": heads[0] if heads else "AutoModel", "auto_map": auto_map, "reason": None}
