"""A target layer's factorization per group, and how to build its low-rank replacement."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..layers.lowrank import LowRankLayer, low_rank_class
from ..views import get_view
from .methods import Factorization
from .ranks import LayerCost
from .report import LayerReport

__all__ = ["LayerPlan"]


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
    tokens : int or None
        For a mixture's expert, the calibration tokens routed to it.
    """

    name: str
    module: nn.Module
    kind: str
    factorizations: list[Factorization] = field(default_factory=list)
    shape: tuple[int, int] = (0, 0)
    tokens: int | None = None

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
        vectors = get_view(self.module).calibrated  # an embedding looks rows up: no multiply-adds
        per_vector = self.dense_params if vectors else 0
        row = LayerReport(
            name=self.name, kind=self.kind, shape=self.shape, groups=self.groups,
            params_before=self.dense_params, params_after=self.dense_params,
            macs_before=per_vector, macs_after=per_vector,
            method=self.factorizations[0].method,
            skip_reason="; ".join(sorted({f.note for f in self.factorizations if f.note})),
            calibration_tokens=self.tokens,
        )
        if k is None:
            row.skip_reason = "the budget keeps it dense: its break-even rank is reached"
        elif k * self.rank_cost >= self.dense_params:
            row.skip_reason = f"rank {k} >= break-even {m * n / (m + n):.1f}: a factorization would not save parameters"
        elif low_rank_class(self.module).refusal(self.module) is not None:
            row.skip_reason = low_rank_class(self.module).refusal(self.module)
        else:
            row.rank = k
            row.params_after = k * self.rank_cost
            row.macs_after = k * self.rank_cost if vectors else k * n
            row.predicted_error = self.predicted_error(k)
        return row

    def build(self, k: int) -> LowRankLayer:
        """The factorized replacement at rank ``k``, in the layer's dtype and device."""
        weight = self.module.weight
        lefts, rights = zip(*(f.factors(k) for f in self.factorizations))
        left = torch.stack(lefts).to(weight.device, weight.dtype)
        right = torch.stack(rights).to(weight.device, weight.dtype)
        return low_rank_class(self.module).from_factors(self.module, left, right)
