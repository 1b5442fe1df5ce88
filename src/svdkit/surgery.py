"""Select modules by name or type, the way PEFT users know, and replace them.

Targets follow PEFT's ``target_modules`` rules: a string is a regular expression that must match
a module's full dotted name; a list matches a name exactly or as a dotted suffix (``"query"``
matches ``"encoder.layer.0.attention.self.query"``).
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

from torch import nn

from .views import get_view

__all__ = ["find_targets", "get_module", "matches_target", "output_head_names", "replace_module"]

TargetSpec = str | Sequence[str] | None


def matches_target(name: str, targets: TargetSpec) -> bool:
    """Whether a dotted module name is selected by a PEFT-style target spec (None selects all)."""
    if targets is None:
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the model's output head: ``get_output_embeddings()`` and Linears tied to an embedding."""
    heads: set[str] = set()
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    embedding_storage = {
        m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)
    }
    for name, module in model.named_modules():
        if head is not None and module is head:
            heads.add(name)
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and weight is not None and weight.data_ptr() in embedding_storage:
            heads.add(name)
    return heads


def find_targets(
    model: nn.Module,
    target_modules: TargetSpec = None,
    *,
    exclude: TargetSpec = (),
    kinds: Iterable[str] | None = None,
    include_embeddings: bool = False,
    include_head: bool = False,
) -> list[tuple[str, nn.Module]]:
    """Supported modules selected by name and kind, in model order.

    Parameters
    ----------
    model : nn.Module
    target_modules : str, list of str, or None
        PEFT-style selection; None selects every supported module.
    exclude : str or list of str
        Same syntax; matching modules are dropped.
    kinds : iterable of str, optional
        View kinds to keep (``"linear"``, ``"conv1d"``, ``"conv2d"``, ``"embedding"``).
    include_embeddings, include_head : bool
        Embeddings and the output head (see :func:`output_head_names`) are left out unless
        asked for, or named explicitly in ``target_modules``.

    Returns
    -------
    list of (name, module)
    """
    kinds = set(kinds) if kinds is not None else None
    heads = output_head_names(model)
    explicit = target_modules is not None
    selected = []
    for name, module in model.named_modules():
        view = get_view(module)
        if view is None or not name:
            continue
        if kinds is not None and view.kind not in kinds:
            continue
        if not matches_target(name, target_modules):
            continue
        if exclude and matches_target(name, exclude):
            continue
        if not explicit and view.kind == "embedding" and not include_embeddings:
            continue
        if not explicit and name in heads and not include_head:
            continue
        selected.append((name, module))
    return selected


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at a dotted name, with an error naming what is missing."""
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise KeyError(f"the model has no module named {name!r}") from exc


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at dotted ``name`` inside ``model`` (in place) and return the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = get_module(model, parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
