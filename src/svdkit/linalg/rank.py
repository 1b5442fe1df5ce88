"""The rank vocabulary: one way to say how much of a matrix to keep, resolved in one place.

An ``int`` is an absolute rank. The typed specs say the rest:

========================  =============================================================
``Energy(0.95)``          smallest rank keeping 95 % of ``sum(s**2)``
``RankRatio(0.25)``       a quarter of the full rank ``min(m, n)``
``ParamRatio(0.6)``       the factorized form keeps 60 % of the dense ``m * n`` parameters
``ErrorTol(0.05)``        smallest rank with relative Frobenius error <= 5 %
========================  =============================================================

:func:`resolve_rank` turns any of them into ``k`` with ``1 <= k <= min(m, n)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence, Union

import numpy as np
import torch

from ._tensor import Array, to_tensor
from .allocation import allocate_ranks
from .spectrum import energy_rank

__all__ = [
    "Energy",
    "allocate_ranks",
    "ErrorTol",
    "ParamRatio",
    "RankLike",
    "RankRatio",
    "RankSpec",
    "rank_from_dict",
    "resolve_rank",
]


class RankSpec:
    """Base class of the typed rank specs; subclasses are frozen dataclasses with one field."""

    kind: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON form, e.g. ``{"kind": "energy", "value": 0.95}``."""
        return {"kind": self.kind, "value": self.value}  # type: ignore[attr-defined]


def _check_number(spec: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(value):
        raise ValueError(f"{spec} needs a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Energy(RankSpec):
    """Keep the smallest rank whose singular values hold ``value`` of ``sum(s**2)``; ``0 < value <= 1``."""

    value: float
    kind = "energy"

    def __post_init__(self) -> None:
        v = _check_number("Energy", self.value)
        if not 0 < v <= 1:
            raise ValueError(f"Energy(value={self.value!r}): the energy fraction must be in (0, 1]")


@dataclass(frozen=True)
class RankRatio(RankSpec):
    """Keep ``floor(value * min(m, n))`` (at least 1) of the full rank; ``0 < value <= 1``."""

    value: float
    kind = "rank_ratio"

    def __post_init__(self) -> None:
        v = _check_number("RankRatio", self.value)
        if not 0 < v <= 1:
            raise ValueError(f"RankRatio(value={self.value!r}): the ratio must be in (0, 1]")


@dataclass(frozen=True)
class ParamRatio(RankSpec):
    """Keep ``value`` of the dense parameter count: ``k = floor(value * m * n / (m + n))``; ``0 < value <= 1``.

    ``value = 1`` is the break-even rank (as many parameters as the dense matrix); a ratio above 1
    would be a "compression" larger than the dense matrix and is refused.
    """

    value: float
    kind = "param_ratio"

    def __post_init__(self) -> None:
        v = _check_number("ParamRatio", self.value)
        if not 0 < v <= 1:
            raise ValueError(
                f"ParamRatio(value={self.value!r}): the ratio must be in (0, 1]"
                + (
                    ": it is the fraction of the dense parameters the factors keep, and above 1 the "
                    "factorization would be larger than the dense matrix"
                    if v > 1
                    else ""
                )
            )


@dataclass(frozen=True)
class ErrorTol(RankSpec):
    """Smallest rank whose relative Frobenius error is at most ``value``; ``0 <= value < 1``."""

    value: float
    kind = "error_tol"

    def __post_init__(self) -> None:
        v = _check_number("ErrorTol", self.value)
        if not 0 <= v < 1:
            raise ValueError(f"ErrorTol(value={self.value!r}): the tolerance must be in [0, 1)")


RankLike = Union[int, RankSpec]

_SPECS = {cls.kind: cls for cls in (Energy, RankRatio, ParamRatio, ErrorTol)}


def rank_from_dict(data: dict[str, Any] | int) -> RankLike:
    """Inverse of :meth:`RankSpec.to_dict`; an int passes through."""
    if isinstance(data, int) and not isinstance(data, bool):
        return data
    if not isinstance(data, dict) or data.get("kind") not in _SPECS or "value" not in data:
        raise ValueError(f"not a rank spec: {data!r}; expected an int or {{'kind': one of {sorted(_SPECS)}, 'value': ...}}")
    return _SPECS[data["kind"]](data["value"])


def resolve_rank(S: Array | None, spec: RankLike, shape: Sequence[int]) -> int:
    """Turn a rank spec into an integer rank for one matrix.

    Parameters
    ----------
    S : Tensor or ndarray of shape (min(m, n),), or None
        All the singular values of the matrix, in descending order; needed by ``Energy`` and
        ``ErrorTol`` only (a shorter spectrum would misjudge the energy the rank keeps).
    spec : int or RankSpec
    shape : (m, n)
        The matrix shape.

    Returns
    -------
    int
        ``1 <= k <= min(m, n)``. An int above ``min(m, n)`` is capped there.

    Raises
    ------
    ValueError
        For a rank below 1, an unknown spec, a spectrum that is missing or of the wrong length;
        the message names the spec and the shape.
    """
    if len(shape) != 2 or any(int(d) < 1 for d in shape):
        raise ValueError(f"shape must be (m, n) with m, n >= 1, got {tuple(shape)}")
    m, n = int(shape[0]), int(shape[1])
    full = min(m, n)
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        if spec < 1:
            raise ValueError(f"rank {spec} for a {m}x{n} matrix: a rank must be >= 1")
        return min(int(spec), full)
    if isinstance(spec, RankRatio):
        return max(1, min(full, math.floor(spec.value * full + 1e-9)))
    if isinstance(spec, ParamRatio):
        return max(1, min(full, math.floor(spec.value * m * n / (m + n) + 1e-9)))
    if isinstance(spec, (Energy, ErrorTol)):
        if S is None:
            raise ValueError(f"{spec!r} for a {m}x{n} matrix needs its singular values")
        T, _ = to_tensor(S)
        if T.ndim != 1 or T.shape[0] != full:
            raise ValueError(
                f"{spec!r} for a {m}x{n} matrix: expected its min(m, n) = {full} singular values, got "
                f"{f'{T.shape[0]}' if T.ndim == 1 else f'shape {tuple(T.shape)}'} "
                "(a spectrum of another matrix, or a truncated one: pass the full spectrum of this matrix)"
            )
        if isinstance(spec, Energy):
            k = energy_rank(T, spec.value)
        else:
            k = _error_rank(T.detach().to(torch.float64), spec.value)
        return max(1, min(full, int(k)))
    raise ValueError(f"unknown rank spec {spec!r} for a {m}x{n} matrix; use an int, Energy, RankRatio, ParamRatio or ErrorTol")


def _error_rank(S: torch.Tensor, tol: float) -> int:
    """Smallest k with sqrt(sum_{i>k} s**2 / sum s**2) <= tol."""
    power = S.square()
    total = power.sum()
    if total <= 0:
        return 0
    # tails[k] = sum_{i >= k} s_i**2, k = 0..r
    tails = torch.cat([power.flip(0).cumsum(0).flip(0), power.new_zeros(1)])
    ok = (tails / total).sqrt() <= tol + 8 * torch.finfo(S.dtype).eps
    return int(ok.float().argmax())
