"""The LoRA configuration: a small frozen, JSON-serialisable dataclass, validated on construction."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Mapping

from .inits import SVD_METHODS, get_init

__all__ = ["LoRAConfig"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class LoRAConfig:
    """How to add LoRA adapters to a model.

    Attributes
    ----------
    rank : int
        Adapter rank ``r >= 1`` (each layer also needs ``r <= min(out, in)``).
    alpha : float or None
        Scaling numerator, ``> 0``; None means ``alpha = rank`` (scaling 1). Scaling is
        ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
    init : str
        A registered init (:func:`svdkit.lora.available_inits`): ``gaussian``, ``pissa``,
        ``milora``, ``svd_delta``, ``eva``.
    targets : str, tuple of str, or None
        PEFT-style ``target_modules``: a regex matched against full names, a list of exact names
        or dotted suffixes, ``"all-linear"`` (every Linear/Conv1D but the output head), or None
        (every Linear, Conv1D and Conv2d but the output head).
    exclude : str or tuple of str
        Same syntax; matching layers are skipped.
    dropout : float
        Dropout on the adapter input, in ``[0, 1)``.
    use_rslora : bool
        Scale by ``alpha / sqrt(r)``.
    svd : {"auto", "exact", "randomized"}
        Decomposition for the SVD inits; ``"auto"`` is randomized when ``rank <= min(m, n) / 10``.
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
        Seed of every random draw (layer ``i`` in model order uses ``seed`` and ``i``).
    rank_pattern, alpha_pattern : dict of str -> number
        Per-layer overrides keyed by exact layer names or dotted suffixes.
    """

    rank: int = 8
    alpha: float | None = None
    init: str = "gaussian"
    targets: str | tuple[str, ...] | None = None
    exclude: str | tuple[str, ...] = ()
    dropout: float = 0.0
    use_rslora: bool = False
    svd: Literal["auto", "exact", "randomized"] = "auto"
    n_iter: int | Literal["auto"] = 4
    oversamples: int = 0
    seed: int = 0
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _is_int(self.rank) or self.rank < 1:
            raise ValueError(f"LoRAConfig.rank must be an int >= 1, got {self.rank!r}")
        if self.alpha is not None and (not _is_number(self.alpha) or self.alpha <= 0):
            raise ValueError(f"LoRAConfig.alpha must be a finite number > 0 (or None for alpha = rank), got {self.alpha!r}")
        get_init(self.init)  # raises naming the choices
        for name in ("targets", "exclude"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
                value = tuple(value)
            if value is None and name == "targets":
                continue
            if not isinstance(value, (str, tuple)) or (isinstance(value, tuple) and not all(isinstance(v, str) for v in value)):
                raise ValueError(f"LoRAConfig.{name} must be a regex string or a list of names, got {value!r}")
        if not _is_number(self.dropout) or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"LoRAConfig.use_rslora must be a bool, got {self.use_rslora!r}")
        if self.svd not in SVD_METHODS:
            raise ValueError(f"LoRAConfig.svd must be one of {SVD_METHODS}, got {self.svd!r}")
        if self.svd == "randomized" and not get_init(self.init).randomized:
            raise ValueError(f"LoRAConfig.svd='randomized' does not apply to init {self.init!r}: it needs the exact SVD")
        if self.n_iter != "auto" and (not _is_int(self.n_iter) or self.n_iter < 0):
            raise ValueError(f"LoRAConfig.n_iter must be 'auto' or an int >= 0, got {self.n_iter!r}")
        if not _is_int(self.oversamples) or self.oversamples < 0:
            raise ValueError(f"LoRAConfig.oversamples must be an int >= 0, got {self.oversamples!r}")
        if not _is_int(self.seed):
            raise ValueError(f"LoRAConfig.seed must be an int, got {self.seed!r}")
        for key, value in dict(self.rank_pattern).items():
            if not isinstance(key, str) or not _is_int(value) or value < 1:
                raise ValueError(f"LoRAConfig.rank_pattern[{key!r}] must be an int >= 1, got {value!r}")
        for key, value in dict(self.alpha_pattern).items():
            if not isinstance(key, str) or not _is_number(value) or value <= 0:
                raise ValueError(f"LoRAConfig.alpha_pattern[{key!r}] must be a finite number > 0, got {value!r}")
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern))
        object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern))

    def rank_for(self, name: str) -> int:
        """The rank of layer ``name``: a ``rank_pattern`` entry (exact name or dotted suffix) or ``rank``."""
        return int(_pattern_value(self.rank_pattern, name, self.rank))

    def alpha_for(self, name: str) -> float:
        """The alpha of layer ``name``: an ``alpha_pattern`` entry, else ``alpha``, else the layer's rank."""
        default = self.alpha if self.alpha is not None else self.rank_for(name)
        return float(_pattern_value(self.alpha_pattern, name, default))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        data = asdict(self)
        for key in ("targets", "exclude"):
            if isinstance(data[key], tuple):
                data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LoRAConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LoRAConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(data))


def _pattern_value(pattern: Mapping[str, Any], name: str, default: Any) -> Any:
    if name in pattern:
        return pattern[name]
    for key, value in pattern.items():
        if name.endswith("." + key):
            return value
    return default
