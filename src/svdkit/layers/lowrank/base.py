"""The contract and the registry of factorized layers (see :mod:`svdkit.layers.lowrank`)."""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import nn

from ...linalg import RankLike, split_factors, truncated_svd
from ...views import get_view, kinds, view_of_kind, weight_matrix

__all__ = [
    "LowRankLayer", "grouped_matrices", "low_rank_class", "low_rank_from_spec", "low_rank_types", "register_low_rank", "register_spec_class",
    "saving_label", "spec_field", "spec_mismatch",
]


def saving_label(dense: int, factored: int) -> str:
    """The parameter change of a factorization as a label: ``"-38%"`` (or ``"+12%"`` when it grows)."""
    return f"{1 - factored / dense:+.0%}".replace("+", "-", 1) if factored <= dense else f"+{factored / dense - 1:.0%}"


def grouped_matrices(module: nn.Module) -> torch.Tensor:
    """A layer's weight matrix as one block per group, shape (groups, m, n).

    ``groups`` is 1 for everything but a grouped convolution, whose matrix view stacks the
    per-group blocks (see :mod:`svdkit.views`).
    """
    view = get_view(module)
    if view is None:
        raise TypeError(f"{type(module).__name__} has no weight view")
    W = weight_matrix(module).detach()
    groups = view.groups(module)
    return W.reshape(groups, W.shape[0] // groups, W.shape[1])


class LowRankLayer(nn.Module):
    """Base class of the factorized layers (see the module docstring for the contract).

    Attributes
    ----------
    rank : int
        Rank per group.
    kinds : tuple of str
        The view kinds this class replaces (set by :func:`register_low_rank`).
    """

    kinds: ClassVar[tuple[str, ...]] = ()
    accepts: ClassVar[str] = ""
    rank: int

    @classmethod
    def from_factors(cls, dense: nn.Module, left: torch.Tensor, right: torch.Tensor) -> "LowRankLayer":
        raise NotImplementedError(f"{cls.__name__} must implement from_factors")  # pragma: no cover - abstract

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], dense: nn.Module) -> "LowRankLayer":
        raise NotImplementedError(f"{cls.__name__} must implement from_spec")  # pragma: no cover - abstract

    def spec(self) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} must implement spec")  # pragma: no cover - abstract

    def to_dense(self) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} must implement to_dense")  # pragma: no cover - abstract

    def share_factors_with(self, other: "LowRankLayer", factors: tuple[str, ...] = ("u", "v")) -> None:
        """Use ``other``'s factor parameters: both (tied weights stay tied once factorized), or one
        (``("v",)``: experts that share a basis).

        Both layers must keep their factors as ``u`` (m, r) and ``v`` (r, n) of the same shapes:
        :class:`LowRankLinear` and :class:`LowRankEmbedding` (an LM head tied to the input
        embedding) do.

        Raises
        ------
        TypeError
            If the factors cannot be shared.
        """
        mine = [getattr(self, f, None) for f in factors]
        theirs = [getattr(other, f, None) for f in factors]
        if not factors or any(p is None for p in (*mine, *theirs)) or [tuple(p.shape) for p in mine] != [tuple(p.shape) for p in theirs]:
            raise TypeError(f"{type(self).__name__} cannot share the factors {factors} of {type(other).__name__}")
        for f, p in zip(factors, theirs):
            setattr(self, f, p)

    @classmethod
    def refusal(cls, dense: nn.Module) -> str | None:
        """Why ``dense`` cannot be factorized by this class although its kind fits (None: it can)."""
        return None

    @classmethod
    def _check_dense(cls, dense: nn.Module) -> None:
        view = get_view(dense)
        if view is None or view.kind not in cls.kinds:
            raise TypeError(f"{cls.__name__} replaces {cls.accepts or ' or '.join(cls.kinds)}, got {type(dense).__name__}")

    @classmethod
    def from_dense(cls, dense: nn.Module, rank: RankLike) -> "LowRankLayer":
        """Truncated SVD of the layer's weight matrix (each group's block), computed in float64.

        Parameters
        ----------
        dense : nn.Module
            A layer of one of the class's kinds.
        rank : int or RankSpec
            Resolved against the singular values (a grouped convolution: the first group's).
        """
        cls._check_dense(dense)
        blocks = grouped_matrices(dense).double()
        (U, S, Vh), stats = truncated_svd(blocks[0], rank)
        if blocks.shape[0] > 1:
            (U, S, Vh), _ = truncated_svd(blocks, stats.rank)
        left, right = split_factors(U, S, Vh)
        dtype = dense.weight.dtype
        return cls.from_factors(dense, left.to(dtype), right.to(dtype))


def register_low_rank(*kinds_: str) -> Callable[[type[LowRankLayer]], type[LowRankLayer]]:
    """Class decorator: ``cls`` factorizes layers of these kinds (it becomes their record's
    ``low_rank``, see :mod:`svdkit.views`).

    Raises
    ------
    KeyError
        For a kind that :func:`svdkit.views.register_view` has not registered.
    """

    def decorate(cls: type[LowRankLayer]) -> type[LowRankLayer]:
        own = cls.__dict__.get("kinds", ())
        cls.kinds = tuple(dict.fromkeys((*own, *kinds_)))
        for kind in kinds_:
            view_of_kind(kind).low_rank = cls
        return cls

    return decorate


def low_rank_class(dense: nn.Module) -> type[LowRankLayer]:
    """The class that factorizes ``dense`` (its kind's ``low_rank``)."""
    view = get_view(dense)
    if view is None or view.low_rank is None:
        known = ", ".join(kinds(lambda v: v.low_rank))
        raise TypeError(f"no low-rank layer for {type(dense).__name__}; supported kinds: {known}")
    return view.low_rank


def low_rank_types() -> tuple[type[LowRankLayer], ...]:
    """Every registered low-rank class."""
    return tuple(dict.fromkeys(view_of_kind(kind).low_rank for kind in kinds(lambda v: v.low_rank)))


_STRUCTURAL: list[type[LowRankLayer]] = []


def register_spec_class(cls: type[LowRankLayer]) -> type[LowRankLayer]:
    """Class decorator: a replacement layer that is saved and rebuilt by its spec like the low-rank
    classes, though it factorizes no kind itself (:class:`svdkit.layers.experts.ExpertBank`:
    a fused experts module unfolded into one module per expert)."""
    _STRUCTURAL.append(cls)
    return cls


def low_rank_from_spec(spec: Mapping[str, Any], dense: nn.Module, *, name: str = "") -> LowRankLayer:
    """An empty factorized layer of the saved geometry ``spec`` for the dense layer ``dense``.

    Raises
    ------
    ValueError
        An unknown type, a missing or mistyped field, or a geometry that does not fit ``dense``;
        the message names the layer.
    """
    if not isinstance(spec, Mapping):
        raise ValueError(f"saved layer {name}: expected a JSON object, got {type(spec).__name__}")
    by_name = {cls.__name__: cls for cls in (*low_rank_types(), *_STRUCTURAL)}
    cls = by_name.get(spec.get("type"))  # type: ignore[arg-type]
    if cls is None:
        raise ValueError(f"saved layer {name} has unknown type {spec.get('type')!r}; known: {sorted(by_name)}")
    try:
        cls._check_dense(dense)
    except TypeError as exc:
        raise ValueError(f"saved layer {name} ({cls.__name__}) does not fit the base model: {exc}") from None
    return cls.from_spec(spec, dense, name=name)


def spec_field(spec: Mapping[str, Any], key: str, kind: type | tuple[type, ...], name: str) -> Any:
    """Field ``key`` of layer ``name``'s saved spec, checked to be a ``kind``; a clear error otherwise."""
    if key not in spec:
        raise ValueError(f"saved layer {name} ({spec.get('type')}): missing field {key!r}")
    value = spec[key]
    if isinstance(value, bool) and kind is not bool:
        raise ValueError(f"saved layer {name} ({spec.get('type')}): field {key!r} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise ValueError(f"saved layer {name} ({spec.get('type')}): field {key!r} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    if key == "rank" and value < 1:
        raise ValueError(f"saved layer {name} ({spec.get('type')}): rank must be >= 1, got {value}")
    return value


def spec_mismatch(name: str, spec: Mapping[str, Any], saved: Any, base: Any, dense: nn.Module) -> ValueError:
    """The error for a saved layer whose geometry does not fit the base model's layer."""
    return ValueError(
        f"saved layer {name} ({spec.get('type')}, {saved}) does not fit the base model's {type(dense).__name__} ({base})"
    )


