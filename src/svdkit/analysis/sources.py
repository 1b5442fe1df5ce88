"""Where weights come from: a module, a state dict, or safetensors files read one tensor at a time.

Each source becomes a list of :class:`WeightItem` (a name, a kind, a shape and a ``load()`` that
produces the tensor when it is needed) and a list of skips with their reasons. Nothing is read
from a safetensors file until ``load()`` is called, so a checkpoint larger than memory can be
walked tensor by tensor.

==========================  ===============================================================
source                      what is analysed
==========================  ===============================================================
``nn.Module``               every module with a weight view (:mod:`svdkit.views`): Linear,
                            transformers Conv1D, Conv2d, Embedding; tied weights once
state dict (name->tensor)   2-D tensors as matrices, 4-D tensors as Conv2d kernels
``.safetensors`` file/dir   the same rules as a state dict, streamed; a directory with a
                            ``*.safetensors.index.json`` reads exactly the shards it names
==========================  ===============================================================

In state dicts and files a trailing ``.weight`` is dropped from the key so names match module
names; 1-D tensors (biases, norms), 3-D and 5-D+ tensors and integer tensors are skipped with a
reason. A sharded checkpoint is never analysed in part: a shard the index names but the
directory lacks, or a tensor the index places in a shard that does not hold it, is an error
naming every one of them. Names are selected with :func:`svdkit.surgery.matches_target` (PEFT's
rules), the matcher compression and LoRA use.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from ..checkpoint import Checkpoint
from ..experts import expert_banks
from ..surgery import TargetSpec, find_targets, matches_target
from ..views import get_view, weight_matrix

__all__ = ["WeightItem", "collect_items", "open_safetensors"]

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None),
}


@dataclass
class WeightItem:
    """One weight to analyse.

    Attributes
    ----------
    name : str
        Module name (or state-dict key without ``.weight``).
    kind : str
        ``"linear"``, ``"conv1d"``, ``"conv2d"``, ``"embedding"`` or ``"dense"`` (a 2-D tensor
        of unknown role).
    shape : tuple of int
        Shape of the stored tensor (4-D for Conv2d).
    dtype : torch.dtype
    load : callable
        ``() -> Tensor``: the matrix (2-D; for Conv2d the 4-D kernel), read when called.
    device : str
    tied_to : str, optional
        For a module whose weight is another module's (a tied LM head): that module's name. Its
        matrix is analysed once, under the first name.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]
    device: str = "cpu"
    tied_to: str | None = None


def _strip(key: str) -> str:
    return key[: -len(".weight")] if key.endswith(".weight") else key


def _select(name: str, target_modules: TargetSpec, exclude_modules: TargetSpec) -> bool:
    if not matches_target(name, target_modules):
        return False
    return not (exclude_modules and matches_target(name, exclude_modules))


def _classify(name: str, shape: tuple[int, ...], dtype: torch.dtype | None) -> tuple[str | None, str]:
    """(kind, "") for an analysable tensor, else (None, reason)."""
    if dtype is None or not dtype.is_floating_point:
        return None, f"dtype {dtype} is not floating point"
    if len(shape) == 2:
        kind = "dense"
    elif len(shape) == 4:
        kind = "conv2d"
    else:
        return None, f"{len(shape)}-D tensor of shape {shape}: only 2-D matrices and 4-D Conv2d kernels are analysed"
    if min(shape[:2]) < 1 or any(d < 1 for d in shape):
        return None, f"empty tensor of shape {shape}"
    return kind, ""


def _from_module(model: nn.Module, target_modules, exclude_modules, kinds) -> tuple[list[WeightItem], list[tuple[str, str]]]:
    # A mixture's fused experts are read one matrix per expert (the bank shares their storage).
    with expert_banks(model, strict=False):
        return _module_items(model, target_modules, exclude_modules, kinds)


def _module_items(model: nn.Module, target_modules, exclude_modules, kinds) -> tuple[list[WeightItem], list[tuple[str, str]]]:
    items, skipped = [], []
    seen: dict[int, str] = {}
    for name, module in find_targets(model, target_modules, exclude_modules=exclude_modules, kinds=kinds,
                                     include_embeddings=True, include_head=True):
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.device.type == "meta":
            skipped.append((name, "no materialised weight"))
            continue
        key = (weight.device, weight.data_ptr(), tuple(weight.shape), weight.stride())
        kind = get_view(module).kind
        if key in seen:
            items.append(WeightItem(name, kind, tuple(weight.shape), weight.dtype, lambda w=weight: w.detach(), str(weight.device), tied_to=seen[key]))
            continue
        seen[key] = name
        tensor = weight.detach()
        # A conv kernel stays 4-D (the analysis makes both its matrix and its slices); any other
        # kind is read as its view's matrix (Conv1D's (out, in), a registered kind's own layout).
        matrix = tensor if kind == "conv2d" else weight_matrix(module).detach()
        items.append(WeightItem(name, kind, tuple(tensor.shape), tensor.dtype, (lambda m=matrix: m), str(tensor.device)))
    return items, skipped


def _from_mapping(state: Mapping[str, Any], target_modules, exclude_modules, kinds) -> tuple[list[WeightItem], list[tuple[str, str]]]:
    items, skipped = [], []
    for key, value in state.items():
        name = _strip(str(key))
        if not isinstance(value, torch.Tensor):
            skipped.append((name, f"not a tensor ({type(value).__name__})"))
            continue
        if not _select(name, target_modules, exclude_modules):
            continue
        kind, reason = _classify(name, tuple(value.shape), value.dtype)
        if kind is None:
            skipped.append((name, reason))
            continue
        if kinds is not None and kind not in kinds:
            continue
        tensor = value.detach()
        items.append(WeightItem(name, kind, tuple(tensor.shape), tensor.dtype, (lambda t=tensor: t), str(tensor.device)))
    return items, skipped


def open_safetensors(path: str | os.PathLike, stack: contextlib.ExitStack, target_modules=None, exclude_modules=(), kinds=None):
    """Items of every tensor in a ``.safetensors`` file or a directory of them, read lazily.

    Parameters
    ----------
    path : str or PathLike
    stack : contextlib.ExitStack
        Keeps the files open; close it when the analysis is done.
    target_modules, exclude_modules, kinds
        As for :func:`collect_items`.

    Raises
    ------
    FileNotFoundError
        For a path that does not exist, a directory without ``.safetensors`` files, or shards
        that the directory's index names but the directory lacks (every one is named).
    ValueError
        For a file that safetensors cannot read (the message names it), an unreadable index, or
        tensors the index places in a shard that does not hold them.
    ImportError
        Without the ``safetensors`` package.
    """
    checkpoint = stack.enter_context(Checkpoint(path))
    items, skipped = [], []
    for key, view, file in checkpoint.items():
        name = _strip(key)
        if not _select(name, target_modules, exclude_modules):
            continue
        shape = tuple(int(d) for d in view.get_shape())
        dtype = _ST_DTYPES.get(view.get_dtype())
        kind, reason = _classify(name, shape, dtype)
        if kind is None:
            skipped.append((name, reason if dtype is not None else f"dtype {view.get_dtype()} is not floating point"))
            continue
        if kinds is not None and kind not in kinds:
            continue
        items.append(WeightItem(name, kind, shape, dtype, (lambda k=key: checkpoint.tensor(k))))
    return items, skipped


def collect_items(
    source: Any,
    stack: contextlib.ExitStack,
    *,
    target_modules: TargetSpec = None,
    exclude_modules: TargetSpec = (),
    kinds: Iterable[str] | None = None,
) -> tuple[list[WeightItem], list[tuple[str, str]], bool]:
    """Items and skips of any supported source.

    Parameters
    ----------
    source : nn.Module, mapping of str to Tensor, or path to a ``.safetensors`` file or directory
    stack : contextlib.ExitStack
        Holds open files.
    target_modules, exclude_modules : PEFT-style selection (see :func:`svdkit.surgery.find_targets`)
    kinds : iterable of str, optional
        Kinds to keep.

    Returns
    -------
    items, skipped, streamed
        ``streamed`` is True for files (read on demand).
    """
    kinds = set(kinds) if kinds is not None else None
    if isinstance(source, nn.Module):
        found = (*_from_module(source, target_modules, exclude_modules, kinds), False)
        names = [n for n, _ in source.named_modules() if n]
    elif isinstance(source, Mapping):
        found = (*_from_mapping(source, target_modules, exclude_modules, kinds), False)
        names = [_strip(str(k)) for k in source]
    elif isinstance(source, (str, os.PathLike)):
        found = (*open_safetensors(source, stack, target_modules, exclude_modules, kinds), True)
        names = None
    else:
        raise TypeError(
            f"cannot analyse a {type(source).__name__}: pass an nn.Module, a state dict, or the path of a "
            ".safetensors file or directory"
        )
    if target_modules is not None and not found[0] and not found[1]:
        sample = f"; names look like: {', '.join(names[:6])} ..." if names else ""
        raise ValueError(f"target_modules={target_modules!r} (exclude_modules={exclude_modules!r}) match no weight of the {type(source).__name__} source{sample}")
    return found
