"""Rank per layer: from a per-layer spec, from ``rank_pattern``, or from a global budget."""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from ..linalg import Energy, ErrorTol, RankLike, allocate_ranks, resolve_rank, round_rank
from ..surgery import check_patterns, pattern_value
from .config import CompressConfig

__all__ = ["LayerCost", "RankCandidate", "choose_ranks"]


class LayerCost:
    """The parameter arithmetic of a layer factorized group by group (a mixin for classes with
    ``shape`` (m, n), the per-group matrix, and ``groups``)."""

    shape: tuple[int, int]
    groups: int

    @property
    def dense_params(self) -> int:
        """Parameters of the dense weight, ``groups * m * n``."""
        return self.groups * self.shape[0] * self.shape[1]

    @property
    def rank_cost(self) -> int:
        """Parameters one more rank costs, ``groups * (m + n)``."""
        return self.groups * (self.shape[0] + self.shape[1])


class RankCandidate(Protocol):
    """What rank selection needs of a layer (a :class:`~svdkit.compression.plan.LayerPlan`, or
    the spectrum of a layer measured before it is factorized)."""

    name: str
    shape: tuple[int, int]

    @property
    def dense_params(self) -> int: ...

    @property
    def rank_cost(self) -> int: ...

    @property
    def singular_values(self) -> torch.Tensor:
        """The (transformed) singular values of the first group, shape (r,)."""

    def spectrum(self) -> torch.Tensor:
        """The spectrum the budget compares across layers, shape (r,)."""


def _fixed_rank(k: int, spec: RankLike, multiple: int, full: int, cap: int | None) -> int | None:
    """A per-layer rank on the layer's multiple and under its cap (None: it stays dense). Specs that
    promise a quality (``Energy``, ``ErrorTol``) round up, the others down."""
    if isinstance(spec, (Energy, ErrorTol)) and k % multiple:
        k = min(-(-k // multiple) * multiple, full // multiple * multiple) or k
    if cap is not None:
        if cap < multiple:
            return None
        k = min(k, cap)
    return round_rank(k, multiple, full)


def choose_ranks(
    candidates: Sequence[RankCandidate], config: CompressConfig, *, other_params: int = 0, check: bool = True,
    multiples: Sequence[int] | None = None, caps: Sequence[int | None] | None = None,
) -> list[int | None]:
    """The rank of each layer (None: keep it dense).

    Parameters
    ----------
    candidates : sequence of RankCandidate
    config : CompressConfig
        ``rank`` (per layer), ``rank_pattern`` (per layer, first) and ``budget`` (global).
    other_params : int
        Parameters of the model outside the candidates (for ``budget_scope="model"``).
    check : bool
        Refuse ``rank_pattern`` keys that match none of the candidates (pass False when the
        candidates are a part of the targets, checked by the caller).
    multiples : sequence of int, optional
        Each layer's ranks are multiples of this (default 1). A per-layer spec is rounded down
        to it (``Energy`` and ``ErrorTol`` up, so that they keep their promise).
    caps : sequence of (int or None), optional
        The largest rank each layer may take (the largest at which it runs faster than dense);
        None: no cap. A layer whose cap is below its multiple stays dense.

    Raises
    ------
    ValueError
        A ``rank_pattern`` key that matches no layer, or a budget that the fixed layers use up.
    """
    if check:
        check_patterns(config.rank_pattern, [c.name for c in candidates], field="rank_pattern")
    multiples = list(multiples) if multiples is not None else [1] * len(candidates)
    caps = list(caps) if caps is not None else [None] * len(candidates)
    fixed: dict[int, int | None] = {}
    for i, candidate in enumerate(candidates):
        spec = pattern_value(config.rank_pattern, candidate.name, None)
        if spec is not None or config.budget is None:
            spec = config.rank if spec is None else spec
            k = resolve_rank(candidate.singular_values, spec, candidate.shape)
            fixed[i] = _fixed_rank(k, spec, multiples[i], min(candidate.shape), caps[i])
    if config.budget is None:
        return [fixed[i] for i in range(len(candidates))]
    free = [i for i in range(len(candidates)) if i not in fixed]
    targeted = sum(c.dense_params for c in candidates)
    if config.budget_scope == "model":
        budget = config.budget * (other_params + targeted) - other_params
    else:
        budget = config.budget * targeted
    budget -= sum(candidates[i].dense_params if k is None else min(k * candidates[i].rank_cost, candidates[i].dense_params)
                  for i, k in fixed.items())
    if budget <= 0:
        raise ValueError(
            f"budget {config.budget} of the {config.budget_scope} parameters leaves nothing for the targeted layers "
            "once the other parameters and the rank_pattern layers are paid"
        )
    try:
        allocated = allocate_ranks(
            [candidates[i].spectrum() for i in free], [candidates[i].rank_cost for i in free],
            [candidates[i].dense_params for i in free], int(budget), min_rank=config.min_rank,
            multiple=[multiples[i] for i in free], max_ranks=[caps[i] for i in free],
        )
    except ValueError as exc:
        slow = [candidates[i].name for i in free if caps[i] is not None and caps[i] < max(multiples[i], config.min_rank)]
        if not slow:
            raise
        raise ValueError(
            f"{exc}: {len(slow)} of these {len(free)} layers must stay dense because no rank of theirs runs faster than the dense "
            f"layer on this device ({', '.join(slow[:3])}{', ...' if len(slow) > 3 else ''}); raise the budget, or compress with "
            "speed_aware='off' (svdkit compress --speed-aware off) to factorize them anyway"
        ) from None
    ranks: list[int | None] = [None] * len(candidates)
    for i, k in fixed.items():
        ranks[i] = k
    for i, k in zip(free, allocated):
        ranks[i] = k
    return ranks
