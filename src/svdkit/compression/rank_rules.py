"""The device's rules on ranks: multiples that suit its kernels, caps below which a factorized
layer runs faster than the dense one (:mod:`svdkit.speed.costs`), and the report notes they
leave on the layers they touch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from torch import nn

from ..causal_lm import is_causal_lm
from ..distributed import current_group
from ..speed.costs import SpeedTarget, cost_model, default_rank_multiple
from ..views import get_view, weight_matrix
from .config import CompressConfig
from .ranks import RankCandidate

__all__ = ["CAPPED_KINDS", "RankRules", "speed_aware"]

CAPPED_KINDS = ("linear", "conv1d")  # the kinds a LowRankLinear replaces: one product -> two


def speed_aware(config: CompressConfig, model: nn.Module) -> bool:
    """Whether ``config.speed_aware`` caps ranks for ``model`` (``"auto"``: a causal language
    model compressed with a global budget)."""
    if config.speed_aware == "auto":
        return config.budget is not None and is_causal_lm(model)
    return config.speed_aware == "on"


@dataclass
class RankRules:
    """Each target's rank multiple and, when speed-aware, its speed cap.

    Attributes
    ----------
    multiples : dict of name -> int
    caps : dict of name -> int
        The largest rank at which the layer, factorized, runs faster than dense (0: none);
        only the capped layers (Linear and Conv1D, one group) of a speed-aware compression.
    source : str
        Where the caps come from (the cost model's description), for the notes.
    """

    multiples: dict[str, int] = field(default_factory=dict)
    caps: dict[str, int] = field(default_factory=dict)
    source: str = ""

    @classmethod
    def for_targets(cls, config: CompressConfig, model: nn.Module, targets: Sequence[tuple[str, nn.Module]]) -> "RankRules":
        """The rules of ``targets``. With several torchrun processes rank 0 measures the caps and
        sends them to the others, so every process chooses the same ranks (every process builds
        its compressor at the same point of the pipeline)."""
        if not targets:
            return cls()
        target = SpeedTarget.of_model(model)
        device = target.device
        shapes = {}
        for name, module in targets:
            view = get_view(module)
            groups = view.groups(module)
            m, n = weight_matrix(module).shape
            shapes[name] = ((m // groups, n), view.kind, groups)
        multiples = {name: config.rank_multiple or default_rank_multiple(device, shape) for name, (shape, _, _) in shapes.items()}
        rules = cls(multiples)
        if not speed_aware(config, model):
            return rules
        capped = {name: shape for name, (shape, kind, groups) in shapes.items() if kind in CAPPED_KINDS and groups == 1}
        group = current_group()
        payload = None
        if group.rank == 0:
            costs = cost_model(target)
            if costs is not None:
                payload = ({name: costs.largest_faster_rank(*shape) for name, shape in capped.items()}, costs.describe())
        payload = group.broadcast_objects([payload], owner=0)[0]
        if payload is not None:
            rules.caps, rules.source = payload
        return rules

    def for_candidates(self, candidates: Sequence[RankCandidate]) -> tuple[list[int], list[int | None]]:
        """The multiples and caps of ``candidates``, in order."""
        return ([self.multiples.get(c.name, 1) for c in candidates], [self.caps.get(c.name) for c in candidates])

    def note(self, name: str, rank: int | None, shape: tuple[int, int]) -> str | None:
        """What the speed cap did to a layer at its chosen ``rank`` (None: nothing)."""
        cap = self.caps.get(name)
        if cap is None:
            return None
        m, n = shape
        breakeven = m * n / (m + n)
        multiple = self.multiples.get(name, 1)
        if rank is None and cap < multiple:
            return f"kept dense for speed: no rank (multiple of {multiple}) runs faster than the dense layer ({self.source})"
        if rank is None and cap < breakeven:
            return (f"kept dense for speed: factorized, it runs faster than dense only up to rank {cap} ({self.source}), "
                    "and dense leaves less error for the budget")
        if rank is not None and rank + multiple > cap and cap < breakeven:
            return f"rank capped at {cap} for speed: the largest rank at which it runs faster than dense ({self.source})"
        return None
