r"""Select modules by name or type, the way PEFT users know, and replace them.

This module is the one place where svdkit matches module names, with PEFT's documented rules:

- **targets** (``target_modules``, ``exclude_modules``): a string is a regular expression that
  must match a module's full dotted name; a list matches a name exactly or as a dotted suffix
  (``"query"`` matches ``"encoder.layer.0.attention.self.query"``, ``"uery"`` does not). This is
  PEFT's ``check_target_module_exists``.
- **patterns** (``rank_pattern``, ``alpha_pattern``): each key is a regular expression matched
  against the end of the name at a dot boundary (PEFT's ``get_pattern_key``:
  ``re.match(rf"(.*\.)?({key})$", name)``), so a plain suffix such as ``"q_proj"`` and a regex
  such as ``"layers\.[0-3]\.mlp\..*"`` both work; the first matching key, in the mapping's
  order, wins.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Iterable, Mapping, Sequence

from torch import nn

from .layers.experts import router_names
from .views import get_view

__all__ = [
    "TargetSpec",
    "check_patterns",
    "find_targets",
    "get_module",
    "matches_target",
    "output_head_names",
    "pattern_key",
    "pattern_value",
    "replace_module",
    "shared_weight_groups",
]

TargetSpec = str | Sequence[str] | None


def matches_target(name: str, spec: TargetSpec) -> bool:
    """Whether a dotted module name is selected by a PEFT-style ``target_modules`` or
    ``exclude_modules`` spec (None selects all)."""
    if spec is None:
        return True
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def pattern_key(patterns: Iterable[str], name: str) -> str | None:
    """The first key of ``patterns`` that matches ``name`` (PEFT's pattern rule), or None."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """``patterns[key]`` for the first key matching ``name`` (see :func:`pattern_key`), else ``default``."""
    key = pattern_key(patterns, name)
    return default if key is None else patterns[key]


def check_patterns(patterns: Iterable[str], names: Sequence[str], *, field: str) -> None:
    """Raise if a pattern key matches none of ``names``: a typo must not be ignored silently.

    Parameters
    ----------
    patterns : iterable of str
        The keys of a ``rank_pattern``-style mapping.
    names : sequence of str
        The module names the patterns apply to (the selected layers).
    field : str
        The option's name, for the message (e.g. ``"rank_pattern"``).

    Raises
    ------
    ValueError
        Naming every unmatched key and the closest layer names.
    """
    unused = [key for key in patterns if not any(pattern_key([key], name) for name in names)]
    if not unused:
        return
    suffixes = sorted({part for name in names for part in _suffixes(name)})
    hints = []
    for key in unused:
        close = difflib.get_close_matches(key, suffixes, n=3, cutoff=0.5)
        hints.append(f"{key!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
    raise ValueError(
        f"{field}: {len(unused)} key(s) match none of the {len(names)} selected layers: {'; '.join(hints)}"
    )


def _suffixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the model's output head: ``get_output_embeddings()`` and Linears tied to an embedding."""
    heads: set[str] = set()
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    embeddings = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    for name, module in model.named_modules():
        if head is not None and module is head:
            heads.add(name)
        if isinstance(module, nn.Linear) and any(_same_tensor(module.weight, e) for e in embeddings):
            heads.add(name)
    return heads


def _same_tensor(a: nn.Parameter, b: nn.Parameter) -> bool:
    """One parameter, or two that share storage (empty ``meta`` parameters count by identity only)."""
    if a is b:
        return True
    return not (a.is_meta or b.is_meta) and a.data_ptr() == b.data_ptr() and a.data_ptr() != 0


def shared_weight_groups(model: nn.Module) -> list[list[str]]:
    """Modules with a weight view that hold one weight tensor between them (tied weights, such
    as an LM head tied to the input embedding), as lists of names in model order.

    A module used at several places counts once (by its first name): that is sharing of the
    module, not of the weight.
    """
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        if not name or get_view(module) is None:  # a factorized layer's weight is a product: no shared tensor
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            owners.setdefault(id(weight), []).append(name)
    return [names for names in owners.values() if len(names) > 1]


def find_targets(
    model: nn.Module,
    target_modules: TargetSpec = None,
    *,
    exclude_modules: TargetSpec = (),
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
    exclude_modules : str or list of str
        Same syntax; matching modules are dropped.
    kinds : iterable of str, optional
        View kinds to keep (``"linear"``, ``"conv1d"``, ``"conv2d"``, ``"embedding"``).
    include_embeddings, include_head : bool
        Embeddings and the output head (see :func:`output_head_names`) are left out unless
        asked for, or named explicitly in ``target_modules``.

    Returns
    -------
    list of (name, module)

    Raises
    ------
    ValueError
        When a regular expression in ``target_modules`` selects a mixture-of-experts router
        (:func:`svdkit.layers.experts.router_names`): routers stay dense unless named in a list.
        A regex ``target_modules`` or ``exclude_modules`` that does not compile (naming it).
    """
    for field, spec in (("target_modules", target_modules), ("exclude_modules", exclude_modules)):
        if isinstance(spec, str):
            try:
                re.compile(spec)
            except re.error as exc:
                raise ValueError(f"{field}: {spec!r} is not a valid regular expression ({exc})") from None
    kinds = set(kinds) if kinds is not None else None
    heads = output_head_names(model)
    routers = router_names(model)
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
        if exclude_modules and matches_target(name, exclude_modules):
            continue
        if not explicit and view.kind == "embedding" and not include_embeddings:
            continue
        if not explicit and name in heads and not include_head:
            continue
        if name in routers and not _names_exactly(name, target_modules):
            if isinstance(target_modules, str):
                raise ValueError(
                    f"target_modules={target_modules!r} selects the mixture-of-experts router {name}, which scores the experts "
                    f"and stays dense unless named: exclude it, or list it by name (target_modules=[{name!r}, ...]) to factorize it"
                )
            continue
        selected.append((name, module))
    return selected


def _names_exactly(name: str, targets: TargetSpec) -> bool:
    """Whether a list selection names ``name`` itself (in full or as a dotted suffix)."""
    return targets is not None and not isinstance(targets, str) and matches_target(name, targets)


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at a dotted name, with an error naming what is missing."""
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise KeyError(f"the model has no module named {name!r}") from exc


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` wherever ``model`` holds the module at dotted ``name`` (in place) and return the
    module it replaced.

    A module the model uses at several places (``nn.Sequential(lin, act, lin)``) is replaced at
    every one of them, so sharing survives and no copy of the old module is left behind.
    """
    if not name:
        raise ValueError("cannot replace the model itself: name a submodule")
    old = get_module(model, name)
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is old:
                setattr(parent, child_name, new)
    return old
