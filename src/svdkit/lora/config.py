"""The LoRA configuration: a small frozen, JSON-serialisable dataclass, validated on construction.

Its fields carry PEFT's names (``r``, ``lora_alpha``, ``target_modules``, ``exclude_modules``,
``lora_dropout``, ``init_lora_weights``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora``), so
a PEFT user's ``LoraConfig(...)`` arguments and ``adapter_config.json`` work unchanged. The names
of configs saved by earlier svdkit versions (``rank``, ``alpha``, ``init``, ``targets``,
``dropout``, ``exclude``) are read by :meth:`LoRAConfig.from_dict` only, with a
``DeprecationWarning``.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Mapping

from ..linalg import SVD_METHODS, RankLike, RankSpec, SVDMethod, rank_from_dict
from ..surgery import pattern_value
from .inits import get_init

__all__ = ["LoRAConfig"]

# Field names of configs saved by earlier svdkit versions -> today's (PEFT's) names.
_RENAMED = {
    "rank": "r",
    "alpha": "lora_alpha",
    "init": "init_lora_weights",
    "targets": "target_modules",
    "dropout": "lora_dropout",
    "exclude": "exclude_modules",
}

# PEFT adapter_config.json keys that describe the file, not the adapter's math: ignored by from_dict.
PEFT_BOOKKEEPING = frozenset({
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "peft_version", "runtime_config", "fan_in_fan_out", "megatron_core", "qalora_group_size",
})
_NITER = re.compile(r"^pissa_niter_(\d+)$")


def is_neutral(value: Any) -> bool:
    """Whether a PEFT option value leaves plain LoRA as it is (None, False, "none", empty)."""
    return value is None or value is False or value == "none" or (isinstance(value, (dict, list, tuple)) and not value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_rank(value: Any) -> bool:
    return (_is_int(value) and value >= 1) or isinstance(value, RankSpec)


def _rank_json(value: RankLike) -> Any:
    return value.to_dict() if isinstance(value, RankSpec) else value


@dataclass(frozen=True)
class LoRAConfig:
    """How to add LoRA adapters to a model.

    Attributes
    ----------
    r : int or RankSpec
        Adapter rank: an int ``>= 1`` (each layer also needs ``r <= min(out, in)``), or a typed
        spec resolved per layer on the spectrum of the init's source matrix: ``Energy(0.9)`` /
        ``ErrorTol(0.1)`` on the weight's singular values for ``gaussian``, ``kaiming``,
        ``pissa`` and ``milora``, on the target change's for ``svd_delta`` and on the layer
        inputs' (square roots of the input Gram's eigenvalues) for ``eva``; ``RankRatio`` /
        ``ParamRatio`` relative to the weight matrix's shape.
    lora_alpha : float or None
        Scaling numerator, ``> 0``; None means ``lora_alpha = r`` per layer (scaling 1). Scaling
        is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``).
    init_lora_weights : str or True
        A registered init (:func:`svdkit.lora.available_inits`): ``gaussian``, ``kaiming``,
        ``pissa``, ``milora``, ``svd_delta``, ``eva``. ``True`` is PEFT's default and means
        ``kaiming``.
    target_modules : str, tuple of str, or None
        PEFT-style selection: a regex matched against full names, a list of exact names or
        dotted suffixes, ``"all-linear"`` (every Linear/Conv1D but the output head), or None
        (every Linear, Conv1D and Conv2d but the output head).
    exclude_modules : str or tuple of str
        Same syntax (PEFT's ``exclude_modules``); matching layers are skipped.
    lora_dropout : float
        Dropout on the adapter input, in ``[0, 1)``.
    use_rslora : bool
        Scale by ``lora_alpha / sqrt(r)``.
    svd_method : {"auto", "exact", "randomized"}
        Decomposition for the SVD inits; ``"auto"`` is randomized when ``r`` is below a tenth of
        ``min(m, n)`` (:func:`svdkit.linalg.truncated_svd`).
    n_iter : int or "auto"
        Krylov steps of the randomized SVD.
    oversamples : int
        Extra sketch columns of the randomized SVD. The defaults (``n_iter=4``,
        ``oversamples=0``) make the same work as PEFT's ``pissa_niter_4``: ``2 * (4 + 1)`` passes
        over ``W`` with blocks of ``r`` columns; the block Krylov Rayleigh-Ritz step then uses all
        ``5 r`` columns it saw rather than the last ``r`` (Musco & Musco 2015, arXiv:1504.05477,
        run block Krylov at block size ``k``). More oversampling buys accuracy at a cost that
        grows with ``r + oversamples``.
    seed : int
        Seed of every random draw (layer ``i`` in model order uses
        :func:`svdkit.linalg.layer_seed` ``(seed, i)``).
    rank_pattern : dict of str -> int or RankSpec
        Per-layer ranks. Keys follow PEFT's rule (:func:`svdkit.surgery.pattern_key`): a regex
        matched against the end of the layer name at a dot boundary, so plain suffixes
        (``"q_proj"``) and regexes (``r"layers\\.[0-3]\\..*"``) both work; the first match wins.
        A key that matches no selected layer is an error.
    alpha_pattern : dict of str -> float
        Per-layer ``lora_alpha`` values, keyed the same way.
    """

    r: RankLike = 8
    lora_alpha: float | None = None
    init_lora_weights: str = "gaussian"
    target_modules: str | tuple[str, ...] | None = None
    exclude_modules: str | tuple[str, ...] = ()
    lora_dropout: float = 0.0
    use_rslora: bool = False
    svd_method: SVDMethod = "auto"
    n_iter: int | Literal["auto"] = 4
    oversamples: int = 0
    seed: int = 0
    rank_pattern: Mapping[str, RankLike] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _is_rank(self.r):
            raise ValueError(
                f"LoRAConfig.r must be an int >= 1 or a rank spec such as Energy(0.9), got {self.r!r}"
            )
        if self.lora_alpha is not None and (not _is_number(self.lora_alpha) or self.lora_alpha <= 0):
            raise ValueError(
                f"LoRAConfig.lora_alpha must be a finite number > 0 (or None for lora_alpha = r), got {self.lora_alpha!r}"
            )
        object.__setattr__(self, "init_lora_weights", _init_name(self.init_lora_weights))
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, set, frozenset)):
                value = tuple(sorted(value)) if isinstance(value, (set, frozenset)) else tuple(value)
                object.__setattr__(self, name, value)
            if value is None and name == "target_modules":
                continue
            if not isinstance(value, (str, tuple)) or (isinstance(value, tuple) and not all(isinstance(v, str) for v in value)):
                raise ValueError(f"LoRAConfig.{name} must be a regex string or a list of names, got {value!r}")
        if not _is_number(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"LoRAConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"LoRAConfig.use_rslora must be a bool, got {self.use_rslora!r}")
        if self.svd_method not in SVD_METHODS:
            raise ValueError(f"LoRAConfig.svd_method must be one of {SVD_METHODS}, got {self.svd_method!r}")
        if self.svd_method == "randomized" and not get_init(self.init_lora_weights).randomized:
            raise ValueError(
                f"LoRAConfig.svd_method='randomized' does not apply to init {self.init_lora_weights!r}: it needs the exact SVD"
            )
        if self.n_iter != "auto" and (not _is_int(self.n_iter) or self.n_iter < 0):
            raise ValueError(f"LoRAConfig.n_iter must be 'auto' or an int >= 0, got {self.n_iter!r}")
        if not _is_int(self.oversamples) or self.oversamples < 0:
            raise ValueError(f"LoRAConfig.oversamples must be an int >= 0, got {self.oversamples!r}")
        if not _is_int(self.seed):
            raise ValueError(f"LoRAConfig.seed must be an int, got {self.seed!r}")
        for name in ("rank_pattern", "alpha_pattern"):
            if not isinstance(getattr(self, name), Mapping):
                raise ValueError(f"LoRAConfig.{name} must be a dict of layer pattern -> value, got {getattr(self, name)!r}")
        for key, value in dict(self.rank_pattern).items():
            if not isinstance(key, str) or not _is_rank(value):
                raise ValueError(f"LoRAConfig.rank_pattern[{key!r}] must be an int >= 1 or a rank spec, got {value!r}")
        for key, value in dict(self.alpha_pattern).items():
            if not isinstance(key, str) or not _is_number(value) or value <= 0:
                raise ValueError(f"LoRAConfig.alpha_pattern[{key!r}] must be a finite number > 0, got {value!r}")
        for name in ("rank_pattern", "alpha_pattern"):
            for key in getattr(self, name):
                try:
                    re.compile(key)
                except re.error as exc:
                    raise ValueError(f"LoRAConfig.{name} key {key!r} is not a valid regular expression: {exc}") from None
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern))
        object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern))

    def rank_for(self, name: str) -> RankLike:
        """The rank of layer ``name``: the first matching ``rank_pattern`` entry, else ``r``
        (an int or a spec still to resolve on the layer's spectrum)."""
        return pattern_value(self.rank_pattern, name, self.r)

    def alpha_for(self, name: str, rank: int | None = None) -> float:
        """The alpha of layer ``name``: an ``alpha_pattern`` entry, else ``lora_alpha``, else the
        layer's rank (``rank``: the resolved rank, needed when ``r`` is a typed spec)."""
        if rank is None:
            rank = self.rank_for(name)
            if not _is_int(rank):
                raise ValueError(f"layer {name!r} has rank {rank!r}: pass the resolved rank to alpha_for")
        default = self.lora_alpha if self.lora_alpha is not None else rank
        return float(pattern_value(self.alpha_pattern, name, default))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists, rank specs ``{"kind", "value"}`` dicts)."""
        data = asdict(self)
        for key in ("target_modules", "exclude_modules"):
            if isinstance(data[key], tuple):
                data[key] = list(data[key])
        data["r"] = _rank_json(self.r)
        data["rank_pattern"] = {k: _rank_json(v) for k, v in self.rank_pattern.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LoRAConfig":
        """Inverse of :meth:`to_dict`; also reads PEFT's ``adapter_config.json``.

        A dict with a ``peft_type`` key is read as a PEFT LoRA config: bookkeeping keys
        (``task_type``, ``base_model_name_or_path``, ``fan_in_fan_out``, ...) are ignored,
        ``init_lora_weights="pissa_niter_K"`` becomes ``init_lora_weights="pissa",
        svd_method="randomized", n_iter=K``, and any other key (``use_dora``, ``bias``,
        ``modules_to_save``, ``layers_to_transform``, ...) is dropped when it holds its neutral
        value (None, False, ``"none"``, empty) and raises otherwise, since svdkit does not
        implement it. A config saved by an earlier svdkit version, with its field names ``rank``,
        ``alpha``, ``init``, ``targets``, ``dropout`` or ``exclude``, is read under today's names
        with a ``DeprecationWarning``.

        Raises
        ------
        ValueError
            Naming unknown keys, a field given under its earlier and its present name, or the
            PEFT options that svdkit cannot honour.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"a LoRAConfig is a JSON object, got {type(data).__name__}")
        values = dict(data)
        known = set(cls.__dataclass_fields__)
        if "peft_type" in values:
            values = _from_peft(values, known)
        for old, new in _RENAMED.items():  # svdkit's own earlier names (PEFT never used them)
            if old in values:
                if new in values:
                    raise ValueError(f"a LoRAConfig gives both {old!r} (an earlier name) and {new!r}; keep {new!r}")
                warnings.warn(f"LoRAConfig field {old!r} is now called {new!r}", DeprecationWarning, stacklevel=2)
                values[new] = values.pop(old)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown LoRAConfig field(s) {unknown}; known: {sorted(known)}")
        if "r" in values and isinstance(values["r"], dict):
            values["r"] = rank_from_dict(values["r"])
        if isinstance(values.get("rank_pattern"), Mapping):
            values["rank_pattern"] = {
                k: rank_from_dict(v) if isinstance(v, dict) else v for k, v in values["rank_pattern"].items()
            }
        if values.get("exclude_modules", ()) is None:
            values["exclude_modules"] = ()  # PEFT writes null
        return cls(**values)


def _init_name(value: Any) -> str:
    """A registered init name from ``init_lora_weights`` (``True`` is PEFT's default, ``kaiming``)."""
    if value is True:
        return "kaiming"
    if value is False:
        raise ValueError(
            "LoRAConfig.init_lora_weights=False (PEFT's non-zero random B, for debugging) is not supported; "
            "use 'kaiming' (PEFT's default, True) or 'gaussian'"
        )
    if isinstance(value, str) and _NITER.match(value):
        raise ValueError(
            f"LoRAConfig.init_lora_weights={value!r}: svdkit spells it init_lora_weights='pissa', "
            f"svd_method='randomized', n_iter={_NITER.match(value)[1]}"
        )
    get_init(value)  # raises naming the choices
    return value


def _from_peft(values: dict[str, Any], known: set[str]) -> dict[str, Any]:
    """A PEFT ``adapter_config.json`` dict as LoRAConfig fields: as PEFT does with keys it does not
    know, keys svdkit does not know are dropped, unless they hold a value that would matter."""
    if values.get("peft_type") != "LORA":
        raise ValueError(f"a {values.get('peft_type')!r} PEFT config is not a LoRA config (peft_type must be 'LORA')")
    foreign = [k for k in sorted(values) if k not in known and k not in PEFT_BOOKKEEPING]
    unsupported = [f"{k}={values[k]!r}" for k in foreign if not is_neutral(values[k])]
    if unsupported:
        raise ValueError(f"the PEFT config uses {', '.join(unsupported)}, which svdkit does not implement")
    out = {k: v for k, v in values.items() if k in known}
    init = out.get("init_lora_weights")
    match = _NITER.match(init) if isinstance(init, str) else None
    if match:
        out.update(init_lora_weights="pissa", svd_method="randomized", n_iter=int(match[1]))
    return out

