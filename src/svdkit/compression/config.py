"""The configuration of a compression: a small frozen, validated, JSON-serialisable dataclass."""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Mapping

import torch

from ..linalg import ParamRatio, RankLike, RankSpec, rank_from_dict
from ..views import kinds as registered_kinds

__all__ = ["CompressConfig", "REFIT_NEEDS_THE_WHOLE_MODEL"]

REFIT_NEEDS_THE_WHOLE_MODEL = (
    "the closed-form refit runs the dense and the compressed model side by side, stage by stage, on every "
    "calibration batch, which the block pipeline (one block in memory, possibly streamed from disk) cannot do; "
    "the block pipeline fits each block to the inputs the compressed blocks before it produce instead "
    "(an anchored refit of SmolLM2's blocks to the dense outputs made perplexity worse: it fits the calibration text)"
)

# Names of fields in configs saved by earlier svdkit versions -> today's names.
_RENAMED = {"overrides": "rank_pattern", "exclude": "exclude_modules", "alpha": "asvd_alpha",
            "heal_steps": "layerwise_distill_steps", "heal_lr": "layerwise_distill_lr"}


def _rank_to_json(rank: RankLike) -> Any:
    return rank.to_dict() if isinstance(rank, RankSpec) else rank


def _checked_rank_pattern(patterns: Any) -> dict[str, RankLike]:
    if not isinstance(patterns, Mapping):
        raise ValueError(f"rank_pattern: expected a mapping of layer pattern -> rank, got {patterns!r}")
    for name, rank in patterns.items():
        if not isinstance(name, str):
            raise ValueError(f"rank_pattern: keys must be strings (layer names or patterns), got {name!r}")
        try:
            re.compile(name)
        except re.error as exc:
            raise ValueError(f"rank_pattern[{name!r}]: not a valid regular expression ({exc})") from None
        _check_rank(f"rank_pattern[{name!r}]", rank)
    return dict(patterns)


def _check_rank(field_name: str, rank: Any) -> None:
    if isinstance(rank, bool) or not isinstance(rank, (int, RankSpec)):
        raise ValueError(f"{field_name}: expected an int or a rank spec (Energy, RankRatio, ParamRatio, ErrorTol), got {rank!r}")
    if isinstance(rank, int) and rank < 1:
        raise ValueError(f"{field_name}: a rank must be >= 1, got {rank}")


@dataclass(frozen=True)
class CompressConfig:
    """How to compress a model.

    Parameters
    ----------
    rank : int or RankSpec
        Rank of every target layer (unless ``budget`` is set): an int, ``Energy``, ``RankRatio``,
        ``ParamRatio`` or ``ErrorTol``. Default: ``ParamRatio(0.6)``.
    budget : float, optional
        A global budget instead: keep this fraction of the targeted layers' parameters
        (``budget_scope="targets"``) or of the whole model's (``"model"``), shared among layers
        by :func:`svdkit.linalg.allocate_ranks` from their spectra.
    budget_scope : {"targets", "model"}
    rank_pattern : mapping of str -> int or RankSpec
        Per-layer ranks, keyed by PEFT ``rank_pattern`` keys (a layer name, a dotted suffix or a
        regex matched at the end of the name, see :mod:`svdkit.surgery`; the first matching key
        wins); honoured with a budget too (their parameters are paid first). A key that matches
        no target layer is an error.
    method : str
        A registered method (:data:`svdkit.compression.methods.METHODS`): ``"svd"``, ``"asvd"``,
        ``"whiten"`` or ``"fisher"`` (the default; the best in the benchmarks).
    target_modules, exclude_modules : str, list of str, or None
        PEFT-style selection (regex string, or names/suffixes).
    kinds : tuple of str, optional
        Layer kinds to target (:func:`svdkit.views.kinds`).
    include_embeddings, include_head : bool
        Embeddings and the output head are left dense unless asked for.
    asvd_alpha : float
        ASVD's exponent on the mean absolute input.
    damping : float
        Relative damping of the input Gram, raised tenfold until Cholesky succeeds (from 0 to
        :data:`svdkit.linalg.whiten.SMALLEST_DAMPING` first) up to 0.1; a larger damping is
        used as given.
    output_damping : float
        Relative damping of the output-gradient Gram (``fisher``), escalated the same way.
    curvature : str
        The output-side statistics of methods that need gradients, a registered estimate (see
        :mod:`svdkit.compression.curvature`): ``"probes"`` (random probes of the model output),
        ``"labels"`` (the gradients of a causal LM's log-likelihood at the true next tokens: the
        empirical Fisher) or ``"sampled"`` (at tokens sampled from the model: the true Fisher).
        ``"auto"``: ``"labels"`` for causal language models, ``"probes"`` otherwise.
    probes : int, optional
        Random output directions (or sampled tokens per position) per batch for the gradient
        statistics, each a backward pass; None: the estimate's default (2 random probes, 1
        sampled token).
    gradient_batches : int, optional
        Use the first this many calibration batches for the output-gradient statistics of
        ``fisher`` (backward passes cost twice a forward); None: every batch.
    pipeline : {"auto", "model", "blocks"}
        ``"blocks"``: block by block (:mod:`svdkit.compression.block_driver`; memory of one
        block's statistics, each block fitted to the inputs the compressed blocks before it
        produce); ``"model"``: the whole model at once (:mod:`svdkit.compression.model_driver`;
        small models; needed by ``refit``); ``"auto"``: blocks for causal language models whose
        layers sit in a stack of blocks and ask for no refit or layer-wise distillation, the whole model otherwise.
        The report says which ran.
    device : str, optional
        Compute device of the block pipeline: each block visits it while it is processed and
        goes back to where it was (e.g. ``"cuda"`` for a model kept on the CPU).
    min_rank : int
        Smallest rank the budget allocator gives a factorized layer.
    rank_multiple : int, optional
        Every rank is a multiple of this (the budget buys ranks this many at a time; a
        per-layer spec is rounded down, ``Energy`` and ``ErrorTol`` up). None: the device's
        default (:func:`svdkit.speed.default_rank_multiple`: 8 on CPUs and GPUs) on
        layers whose break-even rank is at least 16 multiples, exact ranks on smaller ones.
        Quantizing the factors to int4 needs the rank to be a multiple of the group size.
    speed_aware : {"auto", "on", "off"}
        ``"on"``: cap each factorized Linear's rank at the largest rank at which it runs faster
        than the dense layer on the model's device, at decode (1, 8 and 32 tokens) and prefill
        (4096 tokens), from a cost model measured there and cached
        (:mod:`svdkit.speed.costs`); a layer that no rank makes faster stays dense, and a
        global budget gives what capped layers cannot use to the others. ``"auto"``: on for
        causal language models compressed with a global budget. The report says which layers
        were capped or kept dense, and why.
    refit : int
        Closed-form refit passes (:mod:`svdkit.compression.refit`): each re-solves every factorized
        layer, stage by stage, for the inputs the compressed model actually feeds it, to give the
        dense layer's outputs on the dense model's inputs. Whole-model pipeline only (see
        :data:`REFIT_NEEDS_THE_WHOLE_MODEL`). Methods registered with ``refit=True`` only.
    refine_epochs : int
        Block refinement (block pipeline, :mod:`svdkit.compression.refine`): after each block is
        factorized, train its factors for at most this many epochs so that the block reproduces
        ``refine_target``, stopping early on the held-out calibration batches; 0: none.
    refine_target : {"dense", "shifted"}
        What the refined block reproduces: the dense block's output on the dense model's inputs,
        or on the compressed model's inputs (see :mod:`svdkit.compression.refine`).
    refine_lr : float
        Adam's learning rate for block refinement.
    refine_held_out : float
        Fraction of the calibration batches never trained on by block refinement (at least one):
        its early stopping watches the error on them.
    layerwise_distill_steps : int
        Steps of layer-wise distillation toward the original after compression, for any model
        (:mod:`svdkit.compression.layerwise_distill`: every factorized layer's output and the
        model's output matched to the original's on the calibration batches), after either
        pipeline (the dense model must be kept: not with ``inplace``); 0: none. Healing a causal
        LM by KL distillation on its logits is another step, after compression:
        :func:`svdkit.compression.distill.heal_language_model` (``svdkit heal``,
        ``svdkit compress --heal-steps``).
    layerwise_distill_lr : float
        Learning rate of the layer-wise distillation (Adam).
    expert_basis : {"separate", "shared"}
        A mixture's experts: each factorized on its own, or (``"shared"``) with one factor shared
        by the experts of a layer and a small one each wherever that leaves less error at the
        same parameters (measured per layer and projection, either side:
        :mod:`svdkit.compression.shared_basis`).
    seed : int
    """

    rank: RankLike = ParamRatio(0.6)
    budget: float | None = None
    budget_scope: Literal["targets", "model"] = "targets"
    rank_pattern: Mapping[str, RankLike] = field(default_factory=dict)
    method: str = "fisher"
    target_modules: str | tuple[str, ...] | None = None
    exclude_modules: str | tuple[str, ...] = ()
    kinds: tuple[str, ...] | None = None
    include_embeddings: bool = False
    include_head: bool = False
    asvd_alpha: float = 0.5
    damping: float = 1e-6
    output_damping: float = 1e-2
    curvature: str = "auto"
    probes: int | None = None
    gradient_batches: int | None = None
    pipeline: Literal["auto", "model", "blocks"] = "auto"
    device: str | None = None
    min_rank: int = 1
    rank_multiple: int | None = None
    speed_aware: Literal["auto", "on", "off"] = "auto"
    refit: int = 0
    refine_epochs: int = 0
    refine_target: Literal["dense", "shifted"] = "dense"
    refine_lr: float = 1e-4
    refine_held_out: float = 0.125
    layerwise_distill_steps: int = 0
    layerwise_distill_lr: float = 1e-4
    expert_basis: Literal["separate", "shared"] = "separate"
    seed: int = 0

    def __post_init__(self) -> None:
        from .curvature import CURVATURES
        from .methods import METHODS

        _check_rank("rank", self.rank)
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)) or not 0 < self.budget <= 1):
            raise ValueError(f"budget: the fraction of parameters kept must be in (0, 1], got {self.budget!r}")
        choices = {"curvature": ("auto", *CURVATURES), "expert_basis": ("separate", "shared"),
                   "pipeline": ("auto", "model", "blocks"), "budget_scope": ("targets", "model"),
                   "speed_aware": ("auto", "on", "off")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {', '.join(map(repr, allowed))}, got {getattr(self, name)!r}")
        if self.pipeline == "blocks" and self.refit:
            raise ValueError(f"refit: {REFIT_NEEDS_THE_WHOLE_MODEL}; use pipeline='model' (or 'auto') with it")
        if self.gradient_batches is not None and (isinstance(self.gradient_batches, bool) or not isinstance(self.gradient_batches, int) or self.gradient_batches < 1):
            raise ValueError(f"gradient_batches: expected an int >= 1 or None, got {self.gradient_batches!r}")
        if self.device is not None:
            if not isinstance(self.device, str):
                raise ValueError(f"device: expected a device name such as 'cuda' or 'cpu', got {self.device!r}")
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as exc:
                raise ValueError(f"device: {exc}") from None
        if self.rank_multiple is not None and (isinstance(self.rank_multiple, bool) or not isinstance(self.rank_multiple, int) or self.rank_multiple < 1):
            raise ValueError(f"rank_multiple: expected an int >= 1 (every rank a multiple of it) or None for the device's default, got {self.rank_multiple!r}")
        object.__setattr__(self, "rank_pattern", _checked_rank_pattern(self.rank_pattern))
        if self.method not in METHODS:
            raise ValueError(f"method: unknown method {self.method!r}; choose one of {sorted(METHODS)}")
        if self.curvature != "auto" and not METHODS[self.method].needs_gradients:
            curved = sorted(name for name, m in METHODS.items() if m.needs_gradients)
            raise ValueError(f"curvature: method {self.method!r} measures no curvature (methods that do: {', '.join(curved)}); "
                             "drop the curvature, or choose such a method")
        unknown_options = [o for o in METHODS[self.method].options if o not in {f.name for f in fields(self)}]
        if unknown_options:
            raise ValueError(f"method {self.method!r} is registered with options {unknown_options} that are no CompressConfig fields")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if self.kinds is not None:
            object.__setattr__(self, "kinds", tuple(self.kinds))
            unknown = set(self.kinds) - set(registered_kinds())
            if unknown:
                raise ValueError(f"kinds: unknown layer kinds {sorted(unknown)}; choose from {registered_kinds()}")
        if self.refine_target not in ("dense", "shifted"):
            raise ValueError(f"refine_target: expected 'dense' or 'shifted', got {self.refine_target!r}")
        if isinstance(self.refine_held_out, bool) or not isinstance(self.refine_held_out, (int, float)) or not 0 < self.refine_held_out < 1:
            raise ValueError(f"refine_held_out: expected a fraction in (0, 1), got {self.refine_held_out!r}")
        if self.refine_epochs and self.pipeline == "model":
            raise ValueError("refine_epochs: block refinement runs in the block pipeline (pipeline='blocks' or 'auto'), not with pipeline='model'")
        for name in ("layerwise_distill_lr", "refine_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}: expected a number > 0, got {value!r}")
        for name in ("asvd_alpha", "damping", "output_damping"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
        for name, low in (("probes", 1), ("min_rank", 1), ("refit", 0), ("refine_epochs", 0), ("layerwise_distill_steps", 0)):
            value = getattr(self, name)
            if name == "probes" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        if self.refit and not METHODS[self.method].refit:
            refittable = sorted(name for name, m in METHODS.items() if m.refit)
            raise ValueError(f"refit: the closed-form refit works in the whitened metric; use a method among {refittable}, not {self.method!r}")

    @property
    def needs_data(self) -> bool:
        """Whether the method (or refit, layer-wise distillation, block refinement) needs calibration data."""
        from .methods import METHODS

        return METHODS[self.method].needs_data or self.refit > 0 or self.layerwise_distill_steps > 0 or self.refine_epochs > 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (rank specs as ``{"kind", "value"}``)."""
        out = asdict(self)
        out["rank"] = _rank_to_json(self.rank)
        out["rank_pattern"] = {name: _rank_to_json(rank) for name, rank in self.rank_pattern.items()}
        for name in ("target_modules", "exclude_modules", "kinds"):
            if isinstance(out[name], tuple):
                out[name] = list(out[name])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CompressConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise an error naming them.

        Fields under the names of configs saved by earlier versions (``overrides``, ``exclude``,
        ``alpha``, ``heal_steps``, ``heal_lr``) are read under today's names (``rank_pattern``,
        ``exclude_modules``, ``asvd_alpha``, ``layerwise_distill_steps``,
        ``layerwise_distill_lr``) with a ``DeprecationWarning``.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"a CompressConfig is a JSON object, got {type(data).__name__}")
        values = dict(data)
        for old, new in _RENAMED.items():
            if old in values:
                if new in values:
                    raise ValueError(f"a CompressConfig gives both {old!r} (an earlier name) and {new!r}")
                warnings.warn(f"CompressConfig field {old!r} is now called {new!r}", DeprecationWarning, stacklevel=2)
                values[new] = values.pop(old)
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown CompressConfig fields: {sorted(unknown)}")
        if "rank" in values:
            values["rank"] = rank_from_dict(values["rank"])
        if "rank_pattern" in values:
            if not isinstance(values["rank_pattern"], Mapping):
                raise ValueError(f"rank_pattern: expected a mapping of layer pattern -> rank, got {values['rank_pattern']!r}")
            values["rank_pattern"] = {name: rank_from_dict(rank) for name, rank in values["rank_pattern"].items()}
        return cls(**values)
