"""Experts among the targets: routing-aware statistics for the compressor.

Each expert's Linears see only the tokens routed to it (the bank's forward, or the older
layout's MoE block, routes them), so their Grams are per expert already. Two things remain:

- **how much an expert matters**: Grams are normalized per token seen, but an expert routed one
  token in ten changes the model's output on one token in ten. Each expert layer's ``share`` is
  the fraction of its MoE block's tokens routed to it, and its spectrum is weighed by
  ``sqrt(share)`` when layers are compared for a budget (MoE-SVD and D²-MoE weigh experts by
  routing frequency too).
- **experts that saw few or no tokens**: their Grams are shrunk toward the pooled Gram of their
  siblings (every expert's same projection in the layer), as if the pooled distribution had
  contributed as many tokens as the Gram has dimensions: ``G_e + d * mean(G_pool)``. An expert
  that saw none is whitened by its siblings' statistics alone; its report row says so.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Iterator, Sequence

import torch
from torch import nn

from ..calibrate import GramStats
from ..layers.experts import expert_containers, expert_group
from .statistics import LayerStats

__all__ = ["ExpertStatistics"]


class ExpertStatistics:
    """The expert layers among ``targets`` and the tokens their MoE blocks receive.

    Parameters
    ----------
    model : nn.Module
    targets : sequence of (name, module)

    Attributes
    ----------
    groups : dict of name -> (container, projection, index)
        Every targeted expert layer.
    tokens : dict of container -> int
        Tokens that entered each MoE block while :meth:`counting` (summed over ranks by the caller).
    """

    def __init__(self, model: nn.Module, targets: Sequence[tuple[str, nn.Module]]) -> None:
        containers = {layout.name for layout in expert_containers(model)}
        self.groups = {name: group for name, _ in targets if (group := expert_group(name, containers)) is not None}
        self.tokens: dict[str, int] = {}
        self._blocks = {container: container.rpartition(".")[0] for container, _, _ in self.groups.values()}

    @property
    def names(self) -> set[str]:
        return set(self.groups)

    def __bool__(self) -> bool:
        return bool(self.groups)

    @contextlib.contextmanager
    def counting(self, root: nn.Module, prefix: str = "") -> Iterator[list[str]]:
        """Count the tokens entering the MoE blocks under ``root`` (whose name in the model is
        ``prefix``, e.g. ``"model.layers.3."`` for one decoder block) while inside; yields the
        experts containers counted (their counts start at 0)."""
        handles, counted = [], []
        for container, block_name in self._blocks.items():
            if not block_name.startswith(prefix):
                continue
            block = root.get_submodule(block_name[len(prefix):])
            self.tokens[container] = 0
            counted.append(container)

            def count(module, inputs, container=container):
                x = inputs[0] if inputs else None
                if isinstance(x, torch.Tensor) and x.ndim >= 1:
                    self.tokens[container] = self.tokens.get(container, 0) + x.numel() // max(x.shape[-1], 1)

            handles.append(block.register_forward_pre_hook(count))
        try:
            yield counted
        finally:
            for handle in handles:
                handle.remove()

    def complete(self, inputs: dict[str, GramStats], gradients: dict[str, GramStats] | None, targets: Sequence[tuple[str, nn.Module]]) -> None:
        """Empty statistics for targeted experts that no token reached (in place), so every rank
        holds the same layers and pooling can fill them."""
        for name, module in targets:
            if name not in self.groups:
                continue
            out_features, in_features = module.weight.shape
            if name not in inputs:
                inputs[name] = GramStats.zeros(int(in_features))
            if gradients is not None and name not in gradients:
                gradients[name] = GramStats.zeros(int(out_features))

    def pooled(self, stats: dict[str, LayerStats], *, gradients: bool = True) -> dict[str, LayerStats]:
        """``stats`` with each expert's Grams shrunk toward its siblings' (inputs, and gradients
        when asked) and its ``share`` set; other layers as they are."""
        out = dict(stats)
        siblings: dict[tuple[str, str], list[str]] = {}
        for name in stats:
            if name in self.groups:
                container, projection, _ = self.groups[name]
                siblings.setdefault((container, projection), []).append(name)
        for (container, _), names in siblings.items():
            pooled_inputs = _pooled([stats[n].inputs for n in names])
            pooled_gradients = _pooled([stats[n].gradients for n in names]) if gradients else None
            total = self.tokens.get(container, 0)
            for name in names:
                s = stats[name]
                share = s.inputs.count / total if total else 1.0
                out[name] = replace(
                    s,
                    inputs=_shrunk(s.inputs, pooled_inputs),
                    gradients=_shrunk(s.gradients, pooled_gradients) if gradients else s.gradients,
                    share=min(share, 1.0),
                    tokens=s.inputs.count,
                )
        return out


def _pooled(stats: list[GramStats | None]) -> GramStats | None:
    present = [s for s in stats if s is not None and s.count > 0]
    if not present:
        return None
    pool = GramStats.zeros(present[0].gram.shape[0], device=present[0].gram.device)
    for s in present:
        pool.merge(s)
    return pool


def _shrunk(own: GramStats | None, pool: GramStats | None) -> GramStats | None:
    """``own + d * mean(pool)``: the pooled distribution counted as ``d`` more vectors."""
    if pool is None:
        return own
    if own is None:  # an expert no token reached: its siblings' statistics stand in
        own = GramStats.zeros(pool.gram.shape[0], device=pool.gram.device)
    d = own.gram.shape[0]
    weight = d / pool.count
    return GramStats(own.gram + weight * pool.gram.to(own.gram.device), own.abs_sum + weight * pool.abs_sum.to(own.abs_sum.device), own.count + d)
