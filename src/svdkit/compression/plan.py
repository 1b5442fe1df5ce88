"""A target layer's factorization per group, and how to build its low-rank replacement."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..layers.lowrank import LowRankLayer, grouped_matrices, low_rank_class
from ..progress import ProgressLike, track
from ..views import get_view
from .config import CompressConfig
from .methods import METHODS, Factorization, Transform, factorize, plain_svd
from .ranks import LayerCost
from .report import LayerReport
from .stats import LayerStats

__all__ = ["LayerPlan", "layer_transforms", "plan_layer", "plan_layers"]


@dataclass
class LayerPlan(LayerCost):
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
    def groups(self) -> int:  # type: ignore[override]
        return len(self.factorizations)

    @property
    def singular_values(self) -> torch.Tensor:
        """The first group's (transformed) singular values, shape (r,)."""
        return self.factorizations[0].S

    def spectrum(self) -> torch.Tensor:
        """Combined spectrum over groups: ``sqrt(sum_g s_gj**2)`` per rank ``j``, shape (r,)."""
        return torch.stack([f.S * f.importance for f in self.factorizations]).square().sum(0).sqrt()

    def predicted_error(self, k: int) -> float:
        power = torch.stack([f.S for f in self.factorizations]).square().sum(0)
        total = float(power.sum())
        return (float(power[k:].sum()) / total) ** 0.5 if total > 0 else 0.0

    def report(self, k: int | None) -> LayerReport:
        """The report row of this layer at rank ``k`` (None: dense); its ``rank`` is None when
        the layer stays dense (the budget said so, or rank ``k`` would not save parameters)."""
        m, n = self.shape
        per_vector = self.dense_params if self.kind != "embedding" else 0
        row = LayerReport(
            name=self.name, kind=self.kind, shape=self.shape, groups=self.groups,
            params_before=self.dense_params, params_after=self.dense_params,
            macs_before=per_vector, macs_after=per_vector,
            method=self.factorizations[0].method,
            skip_reason="; ".join(sorted({f.note for f in self.factorizations if f.note})),
        )
        if k is None:
            row.skip_reason = "the budget keeps it dense: its break-even rank is reached"
        elif k * self.rank_cost >= self.dense_params:
            row.skip_reason = f"rank {k} >= break-even {m * n / (m + n):.1f}: a factorization would not save parameters"
        elif self.kind == "embedding" and (self.module.max_norm is not None or self.module.sparse):
            row.skip_reason = "embeddings with max_norm or sparse gradients are not factorized"
        else:
            row.rank = k
            row.params_after = k * self.rank_cost
            row.macs_after = k * self.rank_cost if self.kind != "embedding" else k * n
            row.predicted_error = self.predicted_error(k)
        return row

    def build(self, k: int) -> LowRankLayer:
        """The factorized replacement at rank ``k``, in the layer's dtype and device."""
        weight = self.module.weight
        lefts, rights = zip(*(f.factors(k) for f in self.factorizations))
        left = torch.stack(lefts).to(weight.device, weight.dtype)
        right = torch.stack(rights).to(weight.device, weight.dtype)
        return low_rank_class(self.module).from_factors(self.module, left, right)


def layer_transforms(module: nn.Module, stats: LayerStats | None, config: CompressConfig) -> list[Transform]:
    """The configured method's transform of each group's weight matrix (embeddings and layers
    without statistics: plain SVD)."""
    method = METHODS[config.method]
    options = {"alpha": config.alpha, "damping": config.damping, "output_damping": config.output_damping}
    blocks = grouped_matrices(module)
    groups = blocks.shape[0]
    if get_view(module).kind == "embedding" or stats is None:
        return [plain_svd(blocks[g]) for g in range(groups)]
    return [method(blocks[g], stats.group(g, groups), **options) for g in range(groups)]


def plan_layer(name: str, module: nn.Module, stats: LayerStats | None, config: CompressConfig) -> LayerPlan:
    """Factorize one target layer with the configured method."""
    factorizations = [factorize(t) for t in layer_transforms(module, stats, config)]
    shape = tuple(grouped_matrices(module).shape[1:])
    return LayerPlan(name, module, get_view(module).kind, factorizations, shape)  # type: ignore[arg-type]


def plan_layers(
    targets: list[tuple[str, nn.Module]],
    stats: dict[str, LayerStats],
    config: CompressConfig,
    progress: ProgressLike = None,
) -> list[LayerPlan]:
    """Factorize every target with the configured method (embeddings: plain SVD)."""
    return [plan_layer(name, module, stats.get(name), config) for name, module in track(targets, progress, desc="layers decomposed")]
