"""Quantized weights as plain tensors and back, and what they weigh.

A torchao weight (a tensor subclass) is stored as its inner tensors under torchao's names,
``<module>._<parameter>_<inner>`` (``...q_proj._u_qdata``, ``..._u_scale``), with its attributes
in the safetensors header under the parameter's name, in torchao's JSON, so that transformers
(``TorchAoConfig``) reads the file too. ``Int4OpaqueTensor``, which torchao 0.18 does not
serialize, is written the same way with its attributes in the same JSON shape, and read back by
svdkit alone. Only the tensor classes listed here are ever rebuilt from a file.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import torch

__all__ = ["QUANTIZED_CLASSES", "flatten_state", "is_quantized", "tensor_bytes", "unflatten_state"]

# Tensor classes svdkit writes and reads; torchao's own safetensors code handles those it knows.
QUANTIZED_CLASSES = ("Int8Tensor", "Int4OpaqueTensor")


def is_quantized(tensor: Any) -> bool:
    """Whether ``tensor`` is a torchao quantized tensor (a ``TorchAOBaseTensor``)."""
    return hasattr(tensor, "tensor_data_names") and isinstance(tensor, torch.Tensor) and type(tensor) is not torch.Tensor


def _inner_names(tensor: Any) -> list[str]:
    names = list(tensor.tensor_data_names)
    names += [n for n in getattr(tensor, "optional_tensor_data_names", []) if getattr(tensor, n, None) is not None]
    return names


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds: a quantized one's inner tensors (data, scales, zero points)."""
    if is_quantized(tensor):
        return sum(tensor_bytes(getattr(tensor, n)) for n in _inner_names(tensor))
    return tensor.numel() * tensor.element_size()


def _split(key: str) -> tuple[str, str]:
    module, _, name = key.rpartition(".")
    return module, name


def _inner_key(key: str, inner: str) -> str:
    module, name = _split(key)
    return f"{module}._{name}_{inner}" if module else f"_{name}_{inner}"


def _metadata(tensor: Any) -> str:
    """torchao's JSON of a quantized tensor; the same shape for a class torchao does not encode."""
    from torchao.prototype.safetensors.safetensors_utils import ALLOWED_TENSORS_SUBCLASSES, TensorSubclassAttributeJSONEncoder

    if type(tensor).__name__ in ALLOWED_TENSORS_SUBCLASSES:
        return json.dumps(tensor, cls=TensorSubclassAttributeJSONEncoder)
    attributes = {}
    for name in (*tensor.tensor_attribute_names, *getattr(tensor, "optional_tensor_attribute_names", [])):
        value = getattr(tensor, name)
        attributes[name] = list(value) if isinstance(value, (torch.Size, tuple)) else value
    return json.dumps({"_type": type(tensor).__name__, "_data": attributes, "_tensor_data_names": _inner_names(tensor)})


def flatten_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Quantized entries of a state dict as plain tensors.

    Returns
    -------
    tensors : dict of str -> Tensor
        Every plain tensor as it was (same object), every quantized one as its inner tensors.
    metadata : dict of str -> str
        The safetensors header in torchao's format: each key's JSON (``{"_type": "Tensor"}`` for
        a plain one) and ``tensor_names``.
    quantized : list of str
        The keys that were quantized.

    Raises
    ------
    ValueError
        A quantized tensor of a class svdkit does not store.
    """
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    quantized = []
    for key, tensor in state.items():
        if is_quantized(tensor):
            if type(tensor).__name__ not in QUANTIZED_CLASSES:
                raise ValueError(f"{key} is a {type(tensor).__name__}; svdkit saves the quantized classes {list(QUANTIZED_CLASSES)}")
            for inner in _inner_names(tensor):
                tensors[_inner_key(key, inner)] = getattr(tensor, inner).detach()
            metadata[key] = _metadata(tensor)
            quantized.append(key)
        else:
            tensors[key] = tensor
            metadata[key] = json.dumps({"_type": "Tensor"})
    metadata["tensor_names"] = json.dumps(list(metadata))
    return tensors, metadata, quantized


def _rebuild_opaque_int4(record: Mapping[str, Any], inner: Mapping[str, torch.Tensor]) -> torch.Tensor:
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor

    data = dict(record["_data"])
    data["shape"] = torch.Size(data["shape"])
    return Int4OpaqueTensor(**inner, **data)


def unflatten_state(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], quantized: list[str],
                    where: str = "the weights") -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten_state` for the keys ``quantized`` (the rest pass through).

    Raises
    ------
    ValueError
        A key whose record or inner tensors are missing, or of a class svdkit does not read;
        the message names ``where`` and the key.
    """
    from torchao.prototype.safetensors.safetensors_utils import object_from_dict

    out = dict(tensors)
    for key in quantized:
        try:
            record = json.loads(metadata[key])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{where}: the header has no readable record of the quantized tensor {key}") from None
        kind = record.get("_type") if isinstance(record, dict) else None
        if kind not in QUANTIZED_CLASSES:
            raise ValueError(f"{where}: {key} is recorded as {kind!r}; svdkit reads the quantized classes {list(QUANTIZED_CLASSES)}")
        names = record.get("_tensor_data_names") or []
        missing = [_inner_key(key, n) for n in names if _inner_key(key, n) not in out]
        if missing:
            raise ValueError(f"{where}: the quantized tensor {key} lacks {missing}")
        inner = {n: out.pop(_inner_key(key, n)) for n in names}
        if kind == "Int4OpaqueTensor":
            out[key] = _rebuild_opaque_int4(record, inner)
        else:
            record = dict(record, _data=dict(record["_data"], **inner))
            out[key] = object_from_dict(record)
    return out
