"""Every weight a loaded model needs came from its checkpoint.

transformers initializes a weight the checkpoint lacks (or holds in another shape, when asked to
go on) at random and only logs it; a model loaded that way compresses, evaluates and saves
without complaint. :func:`svdkit.load_model` refuses it here, naming the weights, unless the
caller asks for a partial load (``allow_missing=True``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from torch import nn

from .checkpoint import Checkpoint

__all__ = ["check_loading", "check_sentence_weights", "pretrained_with_info"]

logger = logging.getLogger(__name__)


def pretrained_with_info(auto: Any, folder: Path, **kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """``auto.from_pretrained(folder, **kwargs)`` and transformers' loading info (missing and
    mismatched keys: a weight of another shape is reported there, not raised, so that
    :func:`check_loading` names it with both shapes)."""
    return auto.from_pretrained(str(folder), output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)


def _refuse_missing(source: Path, name: str, missing: list[str], allow_missing: bool) -> None:
    if missing and not allow_missing:
        listed = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(
            f"{source} lacks {len(missing)} weight(s) that {name} needs: {listed}; transformers would initialize them at "
            "random. Complete the checkpoint (a shard or tensor missing, or a file cut short?), or pass allow_missing=True "
            "to svdkit.load_model to load it with those weights random"
        )
    if missing:
        logger.warning("%s: %d weight(s) missing from the checkpoint are random (allow_missing=True): %s", source, len(missing), missing)


def check_loading(source: Path, module: nn.Module, info: dict[str, Any], allow_missing: bool = False) -> None:
    """Refuse a load whose weights did not all come from the checkpoint.

    Parameters
    ----------
    source : Path
        The checkpoint (named in the message).
    module : nn.Module
        The loaded model.
    info : dict
        transformers' loading info (``missing_keys``, ``mismatched_keys``). Tied weights (a head
        tied to the embedding) are not missing.
    allow_missing : bool
        Let missing weights stay random (with a warning); a weight of another shape is always refused.

    Raises
    ------
    ValueError
        Naming each missing weight, or each weight of another shape with both shapes.
    """
    name = type(module).__name__
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda item: item[0])
    if mismatched:
        listed = "; ".join(f"{key} is {tuple(found)} in the checkpoint, {tuple(expected)} in the model" for key, found, expected in mismatched[:8])
        raise ValueError(
            f"{source} does not fit {name}: {len(mismatched)} weight(s) of another shape: {listed}"
            f"{' ...' if len(mismatched) > 8 else ''}; is the checkpoint from another model, or does its config describe another size?"
        )
    _refuse_missing(source, name, sorted(info.get("missing_keys") or ()), allow_missing)


def check_sentence_weights(folder: Path, module: nn.Module, allow_missing: bool = False) -> None:
    """The same for a sentence-transformers directory: every parameter of each transformer
    module (listed in ``modules.json``) is in that module's safetensors files (a checkpoint in
    another format is not checked).

    Raises
    ------
    ValueError
        Naming the missing weights.
    """
    try:
        entries = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # sentence-transformers read it already; nothing to compare against
    for entry in entries if isinstance(entries, list) else ():
        inner = getattr(module._modules.get(str(entry.get("name"))), "auto_model", None)
        where = folder / str(entry.get("path", ""))
        if inner is None or not any(where.glob("*.safetensors")):
            continue
        prefix = getattr(inner, "base_model_prefix", "")
        with Checkpoint(where) as checkpoint:
            missing = [key for key, _ in inner.named_parameters() if key not in checkpoint and f"{prefix}.{key}" not in checkpoint]
        _refuse_missing(where, type(inner).__name__, missing, allow_missing)
