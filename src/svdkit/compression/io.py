"""Save and load compressed models: a JSON description plus safetensors, never a pickle.

A saved directory holds

- ``svdkit_compressed.json``: the format version, the factorized layers with their geometry
  (rank, shapes, bias, source kind), the model spec it came from and the compression config;
- ``model.safetensors``: every tensor of the compressed model's state dict.

:func:`load_compressed` rebuilds the factorized structure on a dense model of the original
architecture and loads the weights; :func:`decompress` turns factorized layers back into dense ones.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from .. import __version__
from ..layers.lowrank import LowRankConv2d, LowRankEmbedding, LowRankLinear
from ..surgery import get_module, replace_module

__all__ = ["CONFIG_NAME", "FORMAT_VERSION", "WEIGHTS_NAME", "decompress", "load_compressed", "save_compressed"]

FORMAT_VERSION = 1
CONFIG_NAME = "svdkit_compressed.json"
WEIGHTS_NAME = "model.safetensors"

_LOW_RANK = (LowRankLinear, LowRankConv2d, LowRankEmbedding)


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("saving and loading compressed models needs safetensors: pip install safetensors") from exc
    return safetensors.torch


def _describe(module: nn.Module) -> dict[str, Any]:
    if isinstance(module, LowRankLinear):
        return {"type": "LowRankLinear", "rank": module.rank, "in_features": module.in_features,
                "out_features": module.out_features, "bias": module.bias is not None, "source_kind": module.source_kind}
    if isinstance(module, LowRankConv2d):
        return {"type": "LowRankConv2d", "rank": module.rank, "groups": module.groups, "in_channels": module.in_channels,
                "out_channels": module.out_channels, "kernel_size": list(module.reduce.kernel_size)}
    return {"type": "LowRankEmbedding", "rank": module.rank, "num_embeddings": module.num_embeddings,
            "embedding_dim": module.embedding_dim, "padding_idx": module.padding_idx}


def factorized_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The factorized layers of a model and their geometry, keyed by module name."""
    return {name: _describe(module) for name, module in model.named_modules() if isinstance(module, _LOW_RANK)}


def save_compressed(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    source: str | None = None,
    config: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write a compressed model to ``directory`` atomically.

    Parameters
    ----------
    model : nn.Module
        A model with factorized layers (from :func:`svdkit.compress`).
    directory : path
    source : str, optional
        The model spec of the dense original (e.g. ``"minilm"``), so the directory can be loaded
        without naming a base.
    config : CompressConfig, optional
        Recorded for reference.
    overwrite : bool
        Replace an existing directory.

    Returns
    -------
    Path of the directory.

    Notes
    -----
    Everything is written to a temporary directory beside the target and renamed into place,
    so an interrupted save never leaves a half-written model.
    """
    st = _safetensors()
    target = Path(directory)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format_version": FORMAT_VERSION,
        "svdkit_version": __version__,
        "source": source,
        "config": config.to_dict() if hasattr(config, "to_dict") else config,
        "layers": factorized_layers(model),
    }
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        st.save_model(model, str(staging / WEIGHTS_NAME))
        (staging / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, retired / target.name)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _read_meta(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise FileNotFoundError(f"no compressed model directory at {directory}")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).exists():
            raise FileNotFoundError(f"{directory} is missing {name}: not a complete svdkit compressed model")
    try:
        meta = json.loads((directory / CONFIG_NAME).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{directory / CONFIG_NAME} is corrupted: {exc}") from exc
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        raise ValueError(f"{directory / CONFIG_NAME} has format version {version!r}; this svdkit reads version {FORMAT_VERSION}")
    if not isinstance(meta.get("layers"), dict):
        raise ValueError(f"{directory / CONFIG_NAME} has no 'layers' table")
    return meta


def _skeleton(dense: nn.Module, name: str, spec: dict[str, Any]) -> nn.Module:
    kind = spec.get("type")
    mismatch = f"saved layer {name} ({kind}, {{saved}}) does not fit the base model's {type(dense).__name__} ({{base}})"
    if kind == "LowRankLinear":
        W = getattr(dense, "weight", None)
        base_shape = (dense.in_features, dense.out_features) if isinstance(dense, nn.Linear) else (
            (W.shape[0], W.shape[1]) if W is not None and W.ndim == 2 else None)
        saved = (spec["in_features"], spec["out_features"])
        if base_shape != saved:
            raise ValueError(mismatch.format(saved=f"in, out = {saved}", base=f"in, out = {base_shape}"))
        layer = LowRankLinear(spec["in_features"], spec["out_features"], spec["rank"], spec["bias"], device=W.device, dtype=W.dtype)
        layer.source_kind = spec.get("source_kind", "linear")
        return layer
    if kind == "LowRankConv2d":
        if not isinstance(dense, nn.Conv2d):
            raise ValueError(mismatch.format(saved="Conv2d", base="not a Conv2d"))
        saved = (spec["in_channels"], spec["out_channels"], tuple(spec["kernel_size"]), spec["groups"])
        base = (dense.in_channels, dense.out_channels, tuple(dense.kernel_size), dense.groups)
        if saved != base:
            raise ValueError(mismatch.format(saved=f"in, out, kernel, groups = {saved}", base=f"{base}"))
        return LowRankConv2d(dense, spec["rank"])
    if kind == "LowRankEmbedding":
        if not isinstance(dense, nn.Embedding) or (dense.num_embeddings, dense.embedding_dim) != (spec["num_embeddings"], spec["embedding_dim"]):
            base = tuple(dense.weight.shape) if isinstance(dense, nn.Embedding) else "not an Embedding"
            raise ValueError(mismatch.format(saved=f"{spec['num_embeddings']} x {spec['embedding_dim']}", base=base))
        return LowRankEmbedding(spec["num_embeddings"], spec["embedding_dim"], spec["rank"], spec.get("padding_idx"),
                                device=dense.weight.device, dtype=dense.weight.dtype)
    raise ValueError(f"saved layer {name} has unknown type {kind!r}")


def load_compressed(directory: str | os.PathLike, base: nn.Module | str | None = None, *, inplace: bool = False) -> nn.Module:
    """Rebuild a compressed model saved by :func:`save_compressed`.

    Parameters
    ----------
    directory : path
    base : nn.Module, str or None
        A dense model of the original architecture (its weights are replaced), a model spec for
        :func:`svdkit.models.load_model`, or None to use the spec recorded at save time.
    inplace : bool
        Rebuild inside ``base`` itself instead of a deep copy.

    Returns
    -------
    nn.Module

    Raises
    ------
    FileNotFoundError
        A missing directory or file.
    ValueError
        An unknown format version, a corrupted description, or a layer or tensor whose shape
        does not match the base model.
    """
    directory = Path(directory)
    meta = _read_meta(directory)
    if base is None or isinstance(base, str):
        spec = base or meta.get("source")
        if not spec:
            raise ValueError(f"{directory} records no source model: pass base= (a dense model or a model spec)")
        from ..models import load_model

        model = load_model(spec).module
    else:
        model = base if inplace else copy.deepcopy(base)
    for name, spec in meta["layers"].items():
        try:
            dense = get_module(model, name)
        except KeyError as exc:
            raise ValueError(f"the base model has no layer {name!r} that {directory} factorizes: wrong base model?") from exc
        replace_module(model, name, _skeleton(dense, name, spec))
    try:
        missing, unexpected = _safetensors().load_model(model, str(directory / WEIGHTS_NAME), strict=False)
    except RuntimeError as exc:
        raise ValueError(f"the weights in {directory / WEIGHTS_NAME} do not fit the model: {exc}") from exc
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ValueError(f"cannot read {directory / WEIGHTS_NAME}: {exc}") from exc
    if missing or unexpected:
        raise ValueError(
            f"{directory / WEIGHTS_NAME} does not match the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    return model


def decompress(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every factorized layer by its dense equivalent (``to_dense``)."""
    out = model if inplace else copy.deepcopy(model)
    for name, module in [(n, m) for n, m in out.named_modules() if isinstance(m, _LOW_RANK)]:
        replace_module(out, name, module.to_dense())
    return out
