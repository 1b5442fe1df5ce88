"""The one per-layer compressor that both pipelines drive.

:class:`LayerCompressor` knows the configured method (what it needs, its options), the curvature
estimate and the rank rules. A pipeline (:mod:`~svdkit.compression.model_driver` for the whole
model, :mod:`~svdkit.compression.block_driver` block by block, streamed or across torchrun
ranks) only decides *when* batches run and *which* targets are live:

1. :meth:`LayerCompressor.recording` installs the recorders the method needs on a set of
   targets (input Grams; output-gradient Grams when it needs gradients, the pipeline then runs
   the backward passes of :meth:`LayerCompressor.objectives`);
2. :meth:`LayerCompressor.spectrum` (a rank candidate, for a global budget) or
   :meth:`LayerCompressor.plan` (the factorization) turns a layer's statistics into the method's
   transform and its SVD;
3. :meth:`LayerCompressor.choose_ranks` takes the ranks (per layer, ``rank_pattern``, or the
   global budget);
4. :meth:`LayerCompressor.replace` builds the low-rank layers, replaces them at every place they
   sit, and makes tied layers share the factors, returning the report rows.

Neither pipeline names a method: what differs between methods is in their registry entry
(:mod:`svdkit.compression.methods`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..calibrate import GradientRecorder, GramStats, InputRecorder
from ..layers.lowrank import grouped_matrices, low_rank_class
from ..linalg import layer_seed
from ..progress import ProgressLike, track
from ..surgery import replace_module, shared_weight_groups
from ..views import get_view
from .config import CompressConfig
from .experts import ExpertStatistics
from .curvature import CURVATURES, objectives, resolve_curvature
from .methods import METHODS, Transform, factorize, plain_svd, transformed_spectrum
from .plan import LayerPlan
from .rank_rules import RankRules
from .ranks import LayerCost, RankCandidate, choose_ranks
from .report import LayerReport
from .shared_basis import best_sharing
from .statistics import LayerStats

__all__ = ["LayerCompressor", "LayerSpectrum", "Recording", "TiedLayers"]


@dataclass
class LayerSpectrum(LayerCost):
    """A layer's spectrum in the method's metric, before it is factorized (a rank candidate).

    Attributes
    ----------
    name : str
    shape : (m, n)
        The per-group matrix.
    groups : int
    values : list of Tensor of shape (r,)
        Each group's transformed singular values.
    importance : float
        The factor on them when layers are compared for a budget.
    """

    name: str
    shape: tuple[int, int]
    groups: int
    values: list[torch.Tensor]
    importance: float = 1.0

    @property
    def singular_values(self) -> torch.Tensor:
        return self.values[0]

    def spectrum(self) -> torch.Tensor:
        return torch.stack(self.values).square().sum(0).sqrt() * self.importance


class Recording:
    """The recorders of a set of target layers while batches run (a context manager).

    Call :meth:`next_batch` before each batch. Output-gradient Grams are recorded when a
    backward pass reaches a target's output (only with ``gradients``).

    Attributes
    ----------
    inputs : dict of name -> GramStats
        Input Grams (layers fed the same tensor share one object).
    gradients : dict of name -> GramStats
        Output-gradient Grams.
    """

    def __init__(self, targets: Sequence[tuple[str, nn.Module]], gradients: bool, experts: ExpertStatistics | None = None) -> None:
        self._stack = contextlib.ExitStack()
        self.targets = list(targets)
        # Without gradients the input side carries the routing weight of an expert's tokens (with
        # gradients it reaches the output side through the backward pass).
        self._inputs = InputRecorder(targets, weighted=not gradients)
        self._gradients = GradientRecorder(targets, make_leaves=True) if gradients else None
        self.experts = experts
        self.counted: list[str] = []  # the experts containers whose tokens were counted

    def __enter__(self) -> "Recording":
        self._stack.enter_context(self._inputs)
        if self._gradients is not None:
            self._stack.enter_context(self._gradients)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def next_batch(self, index: int | None = None) -> None:
        """Start batch ``index`` (its number in the whole calibration list names it in errors)."""
        self._inputs.next_batch(index)
        if self._gradients is not None:
            self._gradients.next_batch(index)

    def check_reached(self) -> None:
        """Raise if a target never received an input (see :meth:`InputRecorder.check_reached`);
        experts no token was routed to get empty statistics instead."""
        experts = self.experts.names if self.experts is not None else set()
        self._inputs.check_reached(optional=experts)
        if self.experts is not None:
            self.experts.complete(self._inputs.stats, self._gradients.stats if self._gradients is not None else None, self.targets)

    @property
    def inputs(self) -> dict[str, GramStats]:
        return self._inputs.stats

    @property
    def gradients(self) -> dict[str, GramStats]:
        return self._gradients.stats if self._gradients is not None else {}

    def statistics(self) -> dict[str, LayerStats]:
        """Each recorded target's :class:`LayerStats`."""
        return {name: LayerStats(stats, self.gradients.get(name)) for name, stats in self.inputs.items()}


@dataclass
class TiedLayers:
    """Targets that hold one weight (tied weights): each group is factorized once.

    Attributes
    ----------
    followers : dict of str -> list of str
        The layer factorized for a group -> the other layers of the group, which share its
        factors (layers of the group that were not targeted are pulled in: factorizing one
        alone would untie the weights).
    """

    followers: dict[str, list[str]]

    @classmethod
    def find(cls, model: nn.Module, targets: Sequence[tuple[str, nn.Module]]) -> "TiedLayers":
        """The tied groups among ``targets``. The factorized layer is a calibrated member when there
        is one (it has statistics; an embedding's input is a token id), else the first targeted one."""
        names = {name for name, _ in targets}
        followers: dict[str, list[str]] = {}
        for group in shared_weight_groups(model):
            targeted = [n for n in group if n in names]
            if not targeted:
                continue
            primary = next((n for n in targeted if get_view(model.get_submodule(n)).calibrated), targeted[0])
            followers[primary] = [n for n in group if n != primary]
        return cls(followers)

    def primaries(self, targets: Sequence[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
        """``targets`` without the followers."""
        following = {name for names in self.followers.values() for name in names}
        return [(n, m) for n, m in targets if n not in following]


class LayerCompressor:
    """Compresses target layers with one config: statistics -> transforms -> ranks -> layers.

    Parameters
    ----------
    config : CompressConfig
    model : nn.Module
        The model being compressed (resolves ``curvature="auto"``, finds the experts).
    targets : sequence of (name, module)
        Its target layers (those inside a mixture's experts get routing-aware statistics,
        :mod:`svdkit.compression.experts`).

    Attributes
    ----------
    config : CompressConfig
    method : Method
        The registry entry of ``config.method``.
    curvature : str or None
        The curvature estimate, when the method needs gradients.
    rules : RankRules
        Each target's rank multiple and, for a speed-aware compression, its speed cap
        (:mod:`svdkit.compression.rank_rules`).
    """

    def __init__(self, config: CompressConfig, model: nn.Module, targets: Sequence[tuple[str, nn.Module]] = ()) -> None:
        self.config = config
        self.method = METHODS[config.method]
        self.curvature = resolve_curvature(config.curvature, model) if self.method.needs_gradients else None
        self.experts = ExpertStatistics(model, targets)
        self.rules = RankRules.for_targets(config, model, targets)

    @property
    def needs_inputs(self) -> bool:
        return self.method.needs_inputs

    @property
    def needs_gradients(self) -> bool:
        return self.method.needs_gradients

    def check_calibration(self, batches: list[Any] | None) -> None:
        """Refuse, before any work, calibration the curvature estimate cannot use."""
        if self.curvature is not None and batches is not None:
            CURVATURES[self.curvature].check_batches(batches)

    def recording(self, targets: Sequence[tuple[str, nn.Module]], *, gradients: bool | None = None) -> Recording:
        """The recorders of ``targets`` (input Grams; output-gradient Grams when the method needs
        them, or as ``gradients`` says)."""
        return Recording(targets, self.needs_gradients if gradients is None else gradients, self.experts)

    def generator(self, batch: int | None = None) -> torch.Generator:
        """A fresh generator for :meth:`objectives`, seeded with the config's seed (and the index
        of the calibration batch it is for: :func:`svdkit.linalg.layer_seed`)."""
        seed = self.config.seed if batch is None else layer_seed(self.config.seed, batch)
        return torch.Generator().manual_seed(seed)

    def objectives(self, result: Any, batch: Any, generator: torch.Generator) -> Iterator[torch.Tensor]:
        """The scalars whose backward passes record the output-gradient Grams (see
        :mod:`svdkit.compression.curvature`)."""
        if self.curvature is None:
            raise ValueError(f"method {self.method.name!r} needs no gradients")
        return objectives(self.curvature, result, batch, self.config.probes, generator)

    def transforms(self, module: nn.Module, stats: LayerStats | None) -> list[Transform]:
        """The method's transform of each group's weight matrix (a layer without statistics,
        such as an embedding: plain SVD)."""
        blocks = grouped_matrices(module)
        groups = blocks.shape[0]
        if stats is None or not get_view(module).calibrated:
            return [plain_svd(blocks[g]) for g in range(groups)]
        options = {name: getattr(self.config, name) for name in self.method.options}
        transforms = [self.method.transform(blocks[g], stats.group(g, groups), **options) for g in range(groups)]
        if stats.share != 1.0:
            for t in transforms:
                t.importance *= stats.share ** 0.5
        return transforms

    def spectrum(self, name: str, module: nn.Module, stats: LayerStats | None) -> LayerSpectrum:
        """The layer's spectrum in the method's metric (singular values only: a rank candidate)."""
        transforms = self.transforms(module, stats)
        return LayerSpectrum(name, tuple(transforms[0].M.shape), len(transforms),
                             [transformed_spectrum(t) for t in transforms], transforms[0].importance)

    def plan(self, name: str, module: nn.Module, stats: LayerStats | None) -> LayerPlan:
        """The layer's factorization (each group's transform and its SVD)."""
        factorizations = [factorize(t) for t in self.transforms(module, stats)]
        shape = tuple(grouped_matrices(module).shape[1:])
        tokens = stats.tokens if stats is not None else None
        return LayerPlan(name, module, get_view(module).kind, factorizations, shape, tokens)  # type: ignore[arg-type]

    def plans(self, targets: Sequence[tuple[str, nn.Module]], stats: dict[str, LayerStats], progress: ProgressLike = None) -> list[LayerPlan]:
        """Every target's factorization."""
        return [self.plan(name, module, stats.get(name)) for name, module in track(targets, progress, desc="layers decomposed")]

    def choose_ranks(self, candidates: Sequence[RankCandidate], *, other_params: int = 0, check: bool = True) -> list[int | None]:
        """The rank of each candidate, None for dense (see :func:`~svdkit.compression.ranks.choose_ranks`),
        on each layer's multiple and under its speed cap."""
        multiples, caps = self.rules.for_candidates(candidates)
        return choose_ranks(candidates, self.config, other_params=other_params, check=check, multiples=multiples, caps=caps)

    def build(self, plans: Sequence[LayerPlan], ranks: Sequence[int | None]) -> list[tuple[LayerReport, nn.Module | None]]:
        """Each plan's report row and rank-``k`` layer (None: it stays dense; the row says why);
        with ``expert_basis="shared"``, a layer's experts share a factor where that leaves less
        error at the same parameters (their rows say which)."""
        built = []
        for plan, k in zip(plans, ranks):
            row = plan.report(k)
            row.speed_cap = self.rules.caps.get(plan.name)
            note = self.rules.note(plan.name, row.rank, plan.shape)
            if note is not None:
                row.skip_reason = note if row.rank is None else "; ".join(n for n in (row.skip_reason, note) if n)
            built.append((row, plan.build(row.rank) if row.rank is not None else None))
        if self.config.expert_basis == "shared":
            self._share_expert_bases(plans, [row.rank for row, _ in built], built)
        return built

    def _share_expert_bases(self, plans: Sequence[LayerPlan], ranks: list[int | None], built: list) -> None:
        groups: dict[tuple[str, str], list[int]] = {}
        for i, plan in enumerate(plans):
            if plan.name in self.experts.groups:
                container, projection, _ = self.experts.groups[plan.name]
                groups.setdefault((container, projection), []).append(i)
        for (container, _), members in groups.items():
            shared = best_sharing([plans[i] for i in members], [ranks[i] for i in members])
            if shared is None:
                continue
            first = None
            for i in members:
                plan, (row, _) = plans[i], built[i]
                left, right = shared.factors[plan.name]
                dtype = plan.module.weight.dtype
                layer = low_rank_class(plan.module).from_factors(plan.module, left.to(dtype), right.to(dtype))
                factor = "v" if shared.side == "right" else "u"
                m, n = plan.shape
                row.rank = shared.rank
                row.params_after = shared.rank * (m if shared.side == "right" else n)
                if first is None:
                    first = layer
                    row.params_after += shared.rank * (n if shared.side == "right" else m)
                else:
                    layer.share_factors_with(first, (factor,))
                row.macs_after = shared.rank * (m + n)
                row.predicted_error = None
                row.method = f"{row.method}+shared-{shared.side}"
                row.skip_reason = (f"shares its {shared.side} factor (rank {shared.rank}) with the {len(members)} experts of {container}: "
                                   f"error {shared.error:.4g} vs {shared.separate_error:.4g} separately at equal parameters")
                built[i] = (row, layer)

    def replace(self, out: nn.Module, plans: Sequence[LayerPlan], ranks: Sequence[int | None],
                tied: TiedLayers | None = None) -> list[LayerReport]:
        """Put each plan's layer (see :meth:`build`) in ``out`` (in place; at every place the layer
        sits) and return the report rows, tied followers included.

        A layer stays dense (its row says why) when its rank is None or would not save
        parameters. A tied follower shares its primary's factors and counts no parameters.
        """
        followers = tied.followers if tied is not None else {}
        rows: list[LayerReport] = []
        for plan, (row, new) in zip(plans, self.build(plans, ranks)):
            # a factorized group that holds the embedding (a tied head) unties the config's tie
            holds_embedding = any(not get_view(out.get_submodule(n)).calibrated for n in [plan.name, *followers.get(plan.name, [])])
            if new is not None:
                replace_module(out, plan.name, new)
            rows.append(row)
            for follower in followers.get(plan.name, []):
                rows.append(_tie_follower(out, follower, plan.name, new, row))
            if new is not None and holds_embedding:
                _untie_in_config(out)
        return rows


def _tie_follower(out: nn.Module, name: str, primary: str, factorized: nn.Module | None, primary_row: LayerReport) -> LayerReport:
    """Replace the tied layer ``name`` by one that shares ``factorized``'s factors; its report row
    counts no parameters (they are counted in ``primary``'s row)."""
    dense = out.get_submodule(name)
    row = LayerReport(name=name, kind=get_view(dense).kind, shape=primary_row.shape, method=primary_row.method)
    if factorized is None:
        row.skip_reason = f"its weight is tied to {primary}'s, which stays dense"
        return row
    follower = low_rank_class(dense).from_factors(dense, factorized.u.detach(), factorized.v.detach())
    follower.share_factors_with(factorized)
    replace_module(out, name, follower)
    row.rank = primary_row.rank
    row.skip_reason = f"its weight is tied to {primary}'s: shares its factors (their parameters are counted there)"
    return row


def _untie_in_config(model: nn.Module) -> None:
    """A factorized tied head shares its factors with the embedding itself; a transformers
    config that still asks to tie ``lm_head.weight`` to the embedding's weight (which no longer
    exist) would make ``tie_weights()`` fail, so it stops asking."""
    config = getattr(model, "config", None)
    if getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
