"""A target layer's factorization per group, and how to build its low-rank replacement."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from ..layers.lowrank import LowRankLayer, grouped_matrices, low_rank_class
from ..views import get_view
from .config import CompressConfig
from .methods import METHODS, Factorization, plain_svd
from .stats import LayerStats

__all__ = ["LayerPlan", "plan_layers"]


@dataclass
class LayerPlan:
    """One target layer with the factorization of each of its groups.

    Attributes
    ----------
    name : str
    module : nn.Module
    kind : str
    factorizations : list of Factorization
        One per group (one for everything but grouped convolutions).
    shape : (m, n)
        The per-group matrix shape.
    """

    name: str
    module: nn.Module
    kind: str
    factorizations: list[Factorization] = field(default_factory=list)
    shape: tuple[int, int] = (0, 0)

    @property
    def groups(self) -> int:
        return len(self.factorizations)

    @property
    def dense_params(self) -> int:
        return self.groups * self.shape[0] * self.shape[1]

    @property
    def rank_cost(self) -> int:
        return self.groups * (self.shape[0] + self.shape[1])

    def spectrum(self) -> torch.Tensor:
        """Combined spectrum over groups: ``sqrt(sum_g s_gj**2)`` per rank ``j``, shape (r,)."""
        return torch.stack([f.S * f.importance for f in self.factorizations]).square().sum(0).sqrt()

    def predicted_error(self, k: int) -> float:
        power = torch.stack([f.S for f in self.factorizations]).square().sum(0)
        total = float(power.sum())
        return (float(power[k:].sum()) / total) ** 0.5 if total > 0 else 0.0

    def build(self, k: int) -> LowRankLayer:
        """The factorized replacement at rank ``k``, in the layer's dtype and device."""
        weight = self.module.weight
        lefts, rights = zip(*(f.factors(k) for f in self.factorizations))
        left = torch.stack(lefts).to(weight.device, weight.dtype)
        right = torch.stack(rights).to(weight.device, weight.dtype)
        return low_rank_class(self.module).from_factors(self.module, left, right)


def plan_layers(
    targets: list[tuple[str, nn.Module]],
    stats: dict[str, LayerStats],
    config: CompressConfig,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> list[LayerPlan]:
    """Factorize every target with the configured method (embeddings: plain SVD)."""
    method = METHODS[config.method]
    options = {"alpha": config.alpha, "damping": config.damping, "output_damping": config.output_damping}
    plans = []
    for name, module in progress(targets) if progress is not None else targets:
        kind = get_view(module).kind
        blocks = grouped_matrices(module)
        groups = blocks.shape[0]
        layer_stats = stats.get(name)
        factorizations = []
        for g in range(groups):
            if kind == "embedding" or layer_stats is None:
                factorizations.append(plain_svd(blocks[g]))
            else:
                factorizations.append(method(blocks[g], layer_stats.group(g, groups), **options))
        plans.append(LayerPlan(name, module, kind, factorizations, tuple(blocks.shape[1:])))
    return plans
