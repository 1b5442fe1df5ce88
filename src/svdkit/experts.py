"""Mixture-of-experts structure: where a model keeps its experts and its routers.

Two layouts are understood:

- **fused** (transformers 5.x: Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek, ...): one module holds a
  layer's experts as 3-D parameters. :func:`expert_banks` unfolds each into an
  :class:`~svdkit.layers.experts.ExpertBank` (one module per expert, sharing the fused storage),
  so every expert matrix is an ordinary Linear for compression and analysis, and folds back the
  banks it made when done (unless asked to keep them).
- **one Linear per expert**: an ``nn.ModuleList`` named ``experts`` (older checkpoints, other
  libraries); nothing to unfold.

A layer's *routers* (the Linear children of an MoE block that score its experts, one output per
expert, or one for a shared expert's gate) stay dense by default: :func:`router_names` finds them
for :func:`svdkit.surgery.find_targets`. The structure itself (:func:`expert_containers`,
:func:`router_names`, :func:`expert_group`) is read in :mod:`svdkit.layers.experts`; this module
changes it.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from torch import nn

from .layers.experts import ExpertBank, ExpertLayout, expert_containers, expert_group, router_names
from .surgery import replace_module

__all__ = ["ExpertLayout", "expert_banks", "expert_containers", "expert_group", "fold_dense_banks", "router_names", "unfold_experts"]


def unfold_experts(model: nn.Module, *, unfold: Callable[[str], bool] = lambda name: True,
                   strict: bool = True) -> list[tuple[str, nn.Module]]:
    """Replace every fused experts module of ``model`` that ``unfold`` selects by an
    :class:`ExpertBank` sharing its storage (in place); returns (name, fused module) of each.

    Raises
    ------
    TypeError
        With ``strict``, a selected fused module of a layout svdkit cannot unfold (naming it, its
        layout and what svdkit compresses); otherwise such a module is left fused.
    """
    made: list[tuple[str, nn.Module]] = []
    for layout in expert_containers(model):
        if layout.layout != "fused" or not unfold(layout.name):
            continue
        if layout.problem is not None:
            if not strict:
                continue
            raise TypeError(f"{layout.name}: {layout.problem}; exclude it (exclude_modules=[{layout.name!r}]) to compress the rest")
        fused = model.get_submodule(layout.name)
        replace_module(model, layout.name, ExpertBank.from_fused(fused))
        made.append((layout.name, fused))
    return made


@contextlib.contextmanager
def expert_banks(model: nn.Module, *, keep: bool = False, unfold: Callable[[str], bool] = lambda name: True,
                 strict: bool = True) -> Iterator[list[str]]:
    """:func:`unfold_experts` for the time of the context; yields the names of the banks.

    With ``keep`` the banks stay in the model on exit (a compressed model keeps those whose
    experts were factorized; see :func:`fold_dense_banks`); otherwise each fused module is put back.
    """
    made = unfold_experts(model, unfold=unfold, strict=strict)
    try:
        yield [name for name, _ in made]
    finally:
        if not keep:
            for name, fused in made:
                replace_module(model, name, fused)


def fold_dense_banks(model: nn.Module) -> None:
    """Fold back every :class:`ExpertBank` of ``model`` none of whose experts was factorized (in place)."""
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, ExpertBank)]:
        if all(type(layer) is nn.Linear for expert in module for layer in (expert.gate_up_proj, expert.down_proj)):
            replace_module(model, name, module.to_dense())
