"""What a saved directory records of its quantized weights, and how it reads them back.

The description (``svdkit_compressed.json``) gets a ``quantization`` entry: the mode, the group
size, torchao's version and each quantized tensor's name, class and shape; the weight file holds
their parts (:mod:`svdkit.quantization.storage`). For a mode plain transformers can load, the export's
``config.json`` gets the ``quantization_config`` that transformers' ``TorchAoConfig`` reads: a
``FqnToConfig`` naming every quantized parameter, so transformers rebuilds exactly those.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from .modes import MODES, QuantMode, torchao
from .storage import is_quantized, unflatten_state

__all__ = ["quantization_record", "read_quantized", "record_mode", "transformers_quantization_config"]


def _mode_of(tensor: torch.Tensor) -> QuantMode:
    for mode in MODES.values():
        if mode.tensor_class == type(tensor).__name__:
            return mode
    raise ValueError(f"no quantization mode makes a {type(tensor).__name__}")


def quantization_record(model: nn.Module, state: Mapping[str, torch.Tensor], cast: torch.dtype | None) -> dict[str, Any] | None:
    """The description's ``quantization`` entry of a model about to be saved (None: no weight is
    quantized).

    Raises
    ------
    ValueError
        Weights quantized in two modes, or a ``cast`` to another dtype than the model's own (its
        quantized weights compute in the dtype they were quantized in).
    """
    quantized = {key: t for key, t in state.items() if is_quantized(t)}
    if not quantized:
        return None
    modes = {key: _mode_of(t) for key, t in quantized.items()}
    names = sorted({m.name for m in modes.values()})
    if len(names) > 1:
        raise ValueError(f"the model's weights are quantized in several modes ({names}); svdkit saves one mode per model")
    dtype = next(iter(quantized.values())).dtype
    if cast is not None and cast != dtype:
        raise ValueError(f"the model's weights are quantized for {dtype} activations: save it in its own dtype (no dtype={cast}), "
                         "or cast the model before quantizing it")
    first = next(iter(quantized.values()))
    block = getattr(first, "block_size", None)
    mode = MODES[names[0]]
    return {"mode": mode.name, "group_size": int(block[-1]) if mode.group_sizes and block else None,
            "torchao_version": torchao().__version__, "tensors": {key: {"class": type(t).__name__, "shape": list(t.shape)} for key, t in quantized.items()}}


def record_mode(record: Mapping[str, Any]) -> QuantMode:
    """The mode of a ``quantization`` entry.

    Raises
    ------
    ValueError
        A mode this svdkit does not know.
    """
    name = record.get("mode") if isinstance(record, Mapping) else None
    if name not in MODES:
        raise ValueError(f"the weights are quantized in mode {name!r}, which this svdkit does not know (it knows {sorted(MODES)})")
    return MODES[name]


def read_quantized(state: dict[str, torch.Tensor], header: Mapping[str, str], meta: Mapping[str, Any], where: str) -> dict[str, torch.Tensor]:
    """``state`` read from weight files with its quantized tensors rebuilt (as the description
    ``meta`` lists them), or as it is for a directory without quantized weights."""
    record = meta.get("quantization")
    if not record:
        return state
    record_mode(record)
    tensors = record.get("tensors")
    if not isinstance(tensors, Mapping) or not tensors:
        raise ValueError(f"{where}: the description's 'quantization' entry lists no tensors")
    torchao()
    return unflatten_state(state, header, list(tensors), where=where)


def transformers_quantization_config(record: Mapping[str, Any]) -> dict[str, Any]:
    """``config.json``'s ``quantization_config`` for transformers' ``TorchAoConfig``: the mode's
    torchao config for every quantized parameter, by its full name.

    Raises
    ------
    ValueError
        A mode transformers cannot load (the reason).
    """
    mode = record_mode(record)
    if mode.transformers is not None:
        raise ValueError(mode.transformers)
    from torchao.quantization import FqnToConfig
    from transformers import TorchAoConfig

    config = mode.make_config(record.get("group_size"))
    return TorchAoConfig(FqnToConfig({key: config for key in record["tensors"]})).to_dict()
