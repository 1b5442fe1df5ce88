"""Working with a model that has LoRA layers: find them, freeze around them, save and load their
state, merge them into the base weights, and take them out again after a failure."""

from __future__ import annotations

import copy
from typing import Mapping, Sequence

import torch
from torch import nn

from ..layers.lora import LoRALayer
from ..surgery import replace_module

__all__ = [
    "load_lora_state_dict",
    "lora_layers",
    "lora_state_dict",
    "mark_only_lora_trainable",
    "merge_and_unload",
    "merge_lora",
    "unmerge_lora",
    "unwrap_lora_layers",
]

_STATE_KEYS = ("lora_A.weight", "lora_B.weight", "lora_A_init", "lora_B_init")


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALayer]]:
    """The LoRA wrappers inside ``model``, as (dotted name, layer) in model order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALayer)]


def mark_only_lora_trainable(model: nn.Module) -> nn.Module:
    """Freeze every parameter of ``model`` except the LoRA factors (in place; returns ``model``)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in lora_layers(model):
        layer.lora_A.weight.requires_grad_(True)
        layer.lora_B.weight.requires_grad_(True)
    return model


def unwrap_lora_layers(model: nn.Module, placed: Sequence[tuple[str, LoRALayer]]) -> None:
    """Undo a partly applied adapter pass (in place): each wrapper in ``placed`` gives its weight
    back (:meth:`LoRALayer.restore_moved_weight`, to float rounding) and its base layer returns
    to its place. Used when adding or importing adapters in place fails midway."""
    for name, layer in reversed(list(placed)):
        layer.restore_moved_weight()
        replace_module(model, name, layer.base_layer)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter-only state dict: ``<layer>.lora_A.weight``, ``<layer>.lora_B.weight`` and, for
    weight-moving inits, ``<layer>.lora_A_init`` / ``<layer>.lora_B_init``.

    Returns
    -------
    dict of str -> Tensor
        Detached clones, safe to save with ``safetensors.torch.save_file`` or ``torch.save``.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers")
    out: dict[str, torch.Tensor] = {}
    for name, layer in layers:
        out[f"{name}.lora_A.weight"] = layer.lora_A.weight.detach().clone()
        out[f"{name}.lora_B.weight"] = layer.lora_B.weight.detach().clone()
        if layer.moved_weight:
            out[f"{name}.lora_A_init"] = layer.lora_A_init.detach().clone()
            out[f"{name}.lora_B_init"] = layer.lora_B_init.detach().clone()
    return out


def load_lora_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True) -> nn.Module:
    """Load an adapter-only state dict into a model with matching LoRA layers (in place).

    Parameters
    ----------
    model : nn.Module
        A model from :func:`add_lora` with the same targets and ranks (for PiSSA/MiLoRA, built
        with the same init so its base holds the same residual).
    state_dict : dict of str -> Tensor
        From :func:`lora_state_dict`.
    strict : bool
        Raise on keys the model lacks and adapter tensors the state dict lacks.

    Returns
    -------
    nn.Module
        ``model``.

    Raises
    ------
    ValueError
        Naming unexpected or missing keys and shape mismatches; nothing is loaded then.
    """
    layers = dict(lora_layers(model))
    if not layers:
        raise ValueError("the model has no LoRA layers: add_lora() it first")
    updates: list[tuple[LoRALayer, str, torch.Tensor]] = []
    unexpected, mismatched = [], []
    for key, value in state_dict.items():
        name, suffix = _split_key(key)
        layer = layers.get(name)
        if layer is None or suffix is None:
            unexpected.append(key)
            continue
        current = _state_tensor(layer, suffix)
        if current is None or tuple(current.shape) != tuple(value.shape):
            expected = None if current is None else tuple(current.shape)
            mismatched.append(f"{key}: model has {expected}, state dict has {tuple(value.shape)}")
            continue
        updates.append((layer, suffix, value))
    missing = [
        f"{name}.{suffix}" for name, layer in layers.items() for suffix in ("lora_A.weight", "lora_B.weight")
        if f"{name}.{suffix}" not in state_dict
    ]
    problems = []
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched))
    if strict and unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    if strict and missing:
        problems.append("missing keys: " + ", ".join(missing))
    if problems:
        raise ValueError("cannot load the LoRA state dict: " + " | ".join(problems))
    with torch.no_grad():
        for layer, suffix, value in updates:
            _state_tensor(layer, suffix).copy_(value)
    return model


def _split_key(key: str) -> tuple[str, str | None]:
    for suffix in _STATE_KEYS:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return key, None


def _state_tensor(layer: LoRALayer, suffix: str) -> torch.Tensor | None:
    return {
        "lora_A.weight": layer.lora_A.weight,
        "lora_B.weight": layer.lora_B.weight,
        "lora_A_init": layer.lora_A_init,
        "lora_B_init": layer.lora_B_init,
    }[suffix]


def _check_merges(layers: Sequence[tuple[str, LoRALayer]]) -> None:
    """Raise naming the first layer whose merge would write NaN/Inf; nothing is modified."""
    for name, layer in layers:
        try:
            layer.check_merge(what=f"merging layer {name!r}")
        except ValueError as exc:
            raise ValueError(f"{exc}; nothing was merged") from None


def merge_lora(model: nn.Module, *, safe: bool = False) -> nn.Module:
    """Merge every adapter into its base weight (in place; the model computes the same function).

    Parameters
    ----------
    safe : bool
        Check every merged weight for NaN/Inf (and overflow of the weight's dtype) before writing
        any: with a bad adapter anywhere, ``ValueError`` names its layer and nothing is merged.
    """
    layers = _require_layers(model)
    if safe:
        _check_merges(layers)
    for _, layer in layers:
        layer.merge(safe=safe)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_lora` (in place)."""
    for _, layer in _require_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module, *, safe: bool = False, inplace: bool = False) -> nn.Module:
    """A plain model with every adapter merged into its base weight and the wrappers removed.

    Parameters
    ----------
    model : nn.Module
        A model with LoRA layers.
    safe : bool
        Check every merged weight for NaN/Inf before writing any (all or nothing).
    inplace : bool
        False (default): return a merged copy, leaving ``model`` with its adapters.

    Returns
    -------
    nn.Module
        Same architecture as before :func:`add_lora`; the merge is computed in float32 and cast
        back to each weight's dtype. ``requires_grad`` flags are left as they are (the base
        parameters stay frozen).
    """
    if safe:  # check everything before copying or writing anything
        _check_merges(_require_layers(model))
    target = model if inplace else copy.deepcopy(model)
    for name, layer in _require_layers(target):
        replace_module(target, name, layer.merge_and_unload(safe=safe))
    return target


def _require_layers(model: nn.Module) -> list[tuple[str, LoRALayer]]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers")
    return layers
