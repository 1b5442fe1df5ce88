"""Factorized layers: a dense weight ``W ~= left @ right`` applied as two thin products.

One registry maps each view kind (:mod:`svdkit.views`) to the class that factorizes it:

=================================  ===================  ==========================================
dense layer (view kind)            low-rank class       forward
=================================  ===================  ==========================================
``nn.Linear``, transformers        ``LowRankLinear``    ``(x V^T) U^T + b``
``Conv1D`` (linear, conv1d)
``nn.Conv2d`` (conv2d)             ``LowRankConv2d``    ``kh x kw`` conv to ``r`` channels per
                                                        group, then a 1x1 conv
``nn.Embedding`` (embedding)       ``LowRankEmbedding`` look up a row of ``U``, map it by ``V``
=================================  ===================  ==========================================

Every class follows one contract, so compression, saving and loading never branch on types:

- ``from_factors(dense, left, right)`` builds the layer that replaces ``dense`` from factors of
  its weight matrix, ``left`` (m, k) and ``right`` (k, n) (or (groups, m, k) and
  (groups, k, n) for a grouped convolution);
- ``from_dense(dense, rank)`` is the truncated SVD of ``dense`` (:func:`svdkit.linalg.truncated_svd`,
  split by :func:`svdkit.linalg.split_factors`);
- ``spec()`` is the JSON geometry of the layer and ``from_spec(spec, dense)`` an empty layer of
  that geometry for ``dense`` (checked against it), to load saved factors into;
- ``to_dense()`` gives back the equivalent dense layer; ``forward`` runs the factors and never
  rebuilds ``W``.

A module type registered with :func:`svdkit.views.register_view` under an existing kind is
factorized by that kind's class; a new kind needs a class registered with
:func:`register_low_rank`.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..linalg import RankLike, split_factors, truncated_svd
from ..views import get_view, is_conv1d, weight_matrix

__all__ = [
    "LowRankConv2d",
    "LowRankEmbedding",
    "LowRankLayer",
    "LowRankLinear",
    "grouped_matrices",
    "low_rank_class",
    "low_rank_from_spec",
    "low_rank_types",
    "register_low_rank",
]


def _saving(dense: int, factored: int) -> str:
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

    def share_factors_with(self, other: "LowRankLayer") -> None:
        """Use ``other``'s factor parameters (tied weights stay tied once factorized).

        Both layers must keep their factors as ``u`` (m, r) and ``v`` (r, n) of the same shapes:
        :class:`LowRankLinear` and :class:`LowRankEmbedding` (an LM head tied to the input
        embedding) do.

        Raises
        ------
        TypeError
            If the factors cannot be shared.
        """
        mine = (getattr(self, "u", None), getattr(self, "v", None))
        theirs = (getattr(other, "u", None), getattr(other, "v", None))
        if any(p is None for p in (*mine, *theirs)) or [tuple(p.shape) for p in mine] != [tuple(p.shape) for p in theirs]:
            raise TypeError(f"{type(self).__name__} cannot share the factors of {type(other).__name__}")
        self.u, self.v = theirs  # type: ignore[assignment]

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


_REGISTRY: dict[str, type[LowRankLayer]] = {}


def register_low_rank(*kinds: str) -> Callable[[type[LowRankLayer]], type[LowRankLayer]]:
    """Class decorator: ``cls`` factorizes layers of these view kinds."""

    def decorate(cls: type[LowRankLayer]) -> type[LowRankLayer]:
        cls.kinds = tuple(kinds)
        for kind in kinds:
            _REGISTRY[kind] = cls
        return cls

    return decorate


def low_rank_class(dense: nn.Module) -> type[LowRankLayer]:
    """The class that factorizes ``dense`` (by its view kind)."""
    view = get_view(dense)
    if view is None or view.kind not in _REGISTRY:
        kinds = ", ".join(sorted(_REGISTRY))
        raise TypeError(f"no low-rank layer for {type(dense).__name__}; supported kinds: {kinds}")
    return _REGISTRY[view.kind]


def low_rank_types() -> tuple[type[LowRankLayer], ...]:
    """Every registered low-rank class."""
    return tuple(dict.fromkeys(_REGISTRY.values()))


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
    by_name = {cls.__name__: cls for cls in low_rank_types()}
    cls = by_name.get(spec.get("type"))  # type: ignore[arg-type]
    if cls is None:
        raise ValueError(f"saved layer {name} has unknown type {spec.get('type')!r}; known: {sorted(by_name)}")
    try:
        cls._check_dense(dense)
    except TypeError as exc:
        raise ValueError(f"saved layer {name} ({cls.__name__}) does not fit the base model: {exc}") from None
    return cls.from_spec(spec, dense, name=name)


def _field(spec: Mapping[str, Any], key: str, kind: type | tuple[type, ...], name: str) -> Any:
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


def _mismatch(name: str, spec: Mapping[str, Any], saved: Any, base: Any, dense: nn.Module) -> ValueError:
    return ValueError(
        f"saved layer {name} ({spec.get('type')}, {saved}) does not fit the base model's {type(dense).__name__} ({base})"
    )


@register_low_rank("linear", "conv1d")
class LowRankLinear(LowRankLayer):
    """``y = (x V^T) U^T + b``: a rank-``r`` stand-in for a dense ``out x in`` Linear (or Conv1D).

    Parameters
    ----------
    in_features, out_features, rank : int
    bias : bool
    source_kind : {"linear", "conv1d"}
        What :meth:`to_dense` rebuilds.
    device, dtype : optional

    Attributes
    ----------
    u : Parameter of shape (out_features, rank)
    v : Parameter of shape (rank, in_features)
    bias : Parameter of shape (out_features,) or None
    """

    accepts = "nn.Linear or Conv1D"

    def __init__(
        self, in_features: int, out_features: int, rank: int, bias: bool = True, *, source_kind: str = "linear", device=None, dtype=None
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if source_kind not in ("linear", "conv1d"):
            raise ValueError(f"source_kind must be 'linear' or 'conv1d', got {source_kind!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.source_kind = source_kind
        self.u = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.v = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        if self.u.device.type != "meta":
            nn.init.normal_(self.u, std=rank ** -0.5)
            nn.init.normal_(self.v, std=in_features ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.v), self.u, self.bias)

    @classmethod
    def from_factors(cls, dense: nn.Module, left: torch.Tensor, right: torch.Tensor) -> "LowRankLinear":
        """Replace ``dense`` by ``left`` (out, r) @ ``right`` (r, in), with its bias; dtype and
        device follow ``left``."""
        cls._check_dense(dense)
        if left.ndim == 3 and right.ndim == 3 and left.shape[0] == right.shape[0] == 1:
            left, right = left[0], right[0]
        if left.ndim != 2 or right.ndim != 2 or right.shape[0] != left.shape[1]:
            raise ValueError(f"factor shapes do not chain: left {tuple(left.shape)}, right {tuple(right.shape)}")
        expected = tuple(weight_matrix(dense).shape)
        (out_features, rank), in_features = left.shape, right.shape[1]
        if (out_features, in_features) != expected:
            raise ValueError(f"factors of shapes {tuple(left.shape)} and {tuple(right.shape)} give a {out_features}x{in_features} matrix, the {type(dense).__name__} has {expected[0]}x{expected[1]}")
        bias = getattr(dense, "bias", None)
        kind = "conv1d" if is_conv1d(dense) else "linear"
        layer = cls(in_features, out_features, rank, bias is not None, source_kind=kind, device=left.device, dtype=left.dtype)
        with torch.no_grad():
            layer.u.copy_(left)
            layer.v.copy_(right.to(left))
            if bias is not None:
                layer.bias.copy_(bias.detach().to(left))
        return layer

    def spec(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "rank": self.rank, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias is not None, "source_kind": self.source_kind}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], dense: nn.Module, *, name: str = "") -> "LowRankLinear":
        rank = _field(spec, "rank", int, name)
        saved = (_field(spec, "out_features", int, name), _field(spec, "in_features", int, name))
        base = tuple(weight_matrix(dense).shape)
        if saved != base:
            raise _mismatch(name, spec, f"out, in = {saved}", f"out, in = {base}", dense)
        has_bias = _field(spec, "bias", bool, name)
        if has_bias != (getattr(dense, "bias", None) is not None):
            raise _mismatch(name, spec, f"bias={has_bias}", f"bias={not has_bias}", dense)
        W = dense.weight
        return cls(saved[1], saved[0], rank, has_bias, source_kind="conv1d" if is_conv1d(dense) else "linear",
                   device=W.device, dtype=W.dtype)

    def dense_weight(self) -> torch.Tensor:
        """The dense matrix ``U V``, shape (out_features, in_features), computed in float32 or wider."""
        work = torch.promote_types(self.u.dtype, torch.float32)
        return (self.u.to(work) @ self.v.to(work)).to(self.u.dtype)

    def to_dense(self) -> nn.Module:
        """The equivalent dense layer: ``nn.Linear``, or transformers ``Conv1D`` if that was the source."""
        W = self.dense_weight().detach()
        if self.source_kind == "conv1d":
            from transformers.pytorch_utils import Conv1D

            dense = Conv1D(self.out_features, self.in_features).to(W.device, W.dtype)
            with torch.no_grad():
                dense.weight.copy_(W.T)
                dense.bias.copy_(self.bias if self.bias is not None else torch.zeros_like(dense.bias))
            return dense
        dense = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=W.device, dtype=W.dtype)
        with torch.no_grad():
            dense.weight.copy_(W)
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def extra_repr(self) -> str:
        dense = self.in_features * self.out_features
        factored = self.rank * (self.in_features + self.out_features)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}, params={factored:,} vs {dense:,} dense ({_saving(dense, factored)})"
        )


def _pair(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


@register_low_rank("conv2d")
class LowRankConv2d(LowRankLayer):
    """A ``kh x kw`` convolution to ``rank`` channels (per group) followed by a 1x1 convolution.

    The first convolution keeps the original stride, padding, dilation and padding mode, so the
    pair is exact at full rank. With ``groups > 1`` each group is factorized on its own: the
    first convolution maps each group's ``C_in / groups`` channels to ``rank`` channels and the
    1x1 convolution maps them to that group's ``C_out / groups`` outputs.

    Attributes
    ----------
    reduce : nn.Conv2d, weight of shape (groups * rank, C_in / groups, kh, kw)
    expand : nn.Conv2d, weight of shape (C_out, rank, 1, 1), with the bias
    """

    accepts = "nn.Conv2d"

    def __init__(self, conv: nn.Conv2d, rank: int) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if isinstance(conv.padding, str) and conv.padding == "same" and any(s != 1 for s in _pair(conv.stride)):
            raise ValueError("padding='same' needs stride 1")
        factory = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        g = conv.groups
        self.rank, self.groups = rank, g
        self.reduce = nn.Conv2d(
            conv.in_channels, g * rank, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=g, bias=False, padding_mode=conv.padding_mode, **factory,
        )
        self.expand = nn.Conv2d(g * rank, conv.out_channels, 1, groups=g, bias=conv.bias is not None, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.reduce(x))

    @property
    def in_channels(self) -> int:
        return self.reduce.in_channels

    @property
    def out_channels(self) -> int:
        return self.expand.out_channels

    @classmethod
    def from_factors(cls, dense: nn.Conv2d, left: torch.Tensor, right: torch.Tensor) -> "LowRankConv2d":
        """Build from per-group factors of ``dense``'s matrix view.

        Parameters
        ----------
        dense : nn.Conv2d
            The dense layer (geometry and bias are taken from it).
        left : Tensor of shape (groups, C_out / groups, r)
        right : Tensor of shape (groups, r, C_in / groups * kh * kw)
        """
        cls._check_dense(dense)
        conv = dense
        g = conv.groups
        if left.ndim == 2:
            left, right = left.unsqueeze(0), right.unsqueeze(0)
        kh, kw = conv.kernel_size
        rank = left.shape[-1]
        expected_left = (g, conv.out_channels // g, rank)
        expected_right = (g, rank, conv.in_channels // g * kh * kw)
        if tuple(left.shape) != expected_left or tuple(right.shape) != expected_right:
            raise ValueError(
                f"expected factors of shapes {expected_left} and {expected_right} for this convolution "
                f"({g} groups), got left {tuple(left.shape)}, right {tuple(right.shape)}"
            )
        layer = cls(conv, rank)
        with torch.no_grad():
            layer.reduce.weight.copy_(right.reshape(g * rank, conv.in_channels // g, kh, kw))
            layer.expand.weight.copy_(left.reshape(conv.out_channels, rank, 1, 1))
            if conv.bias is not None:
                layer.expand.bias.copy_(conv.bias)
        return layer

    def spec(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "rank": self.rank, "groups": self.groups, "in_channels": self.in_channels,
                "out_channels": self.out_channels, "kernel_size": list(self.reduce.kernel_size)}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], dense: nn.Conv2d, *, name: str = "") -> "LowRankConv2d":
        rank = _field(spec, "rank", int, name)
        saved = (_field(spec, "in_channels", int, name), _field(spec, "out_channels", int, name),
                 tuple(_field(spec, "kernel_size", list, name)), _field(spec, "groups", int, name))
        base = (dense.in_channels, dense.out_channels, tuple(dense.kernel_size), dense.groups)
        if saved != base:
            raise _mismatch(name, spec, f"in, out, kernel, groups = {saved}", f"{base}", dense)
        return cls(dense, rank)

    def to_dense(self) -> nn.Conv2d:
        """The equivalent dense ``nn.Conv2d``."""
        r, g = self.reduce, self.groups
        dense = nn.Conv2d(
            r.in_channels, self.out_channels, r.kernel_size, stride=r.stride, padding=r.padding, dilation=r.dilation,
            groups=g, bias=self.expand.bias is not None, padding_mode=r.padding_mode,
            device=r.weight.device, dtype=r.weight.dtype,
        )
        work = torch.promote_types(r.weight.dtype, torch.float32)
        left = self.expand.weight.to(work).reshape(g, self.out_channels // g, self.rank)
        right = r.weight.to(work).reshape(g, self.rank, -1)
        with torch.no_grad():
            dense.weight.copy_((left @ right).reshape(dense.weight.shape))
            if self.expand.bias is not None:
                dense.bias.copy_(self.expand.bias)
        return dense

    def extra_repr(self) -> str:
        kh, kw = self.reduce.kernel_size
        dense = self.out_channels * (self.in_channels // self.groups) * kh * kw
        factored = sum(p.numel() for p in (self.reduce.weight, self.expand.weight))
        return f"rank={self.rank}, groups={self.groups}, params={factored:,} vs {dense:,} dense ({_saving(dense, factored)})"


@register_low_rank("embedding")
class LowRankEmbedding(LowRankLayer):
    """``E ~= U V``: each token looks up a rank-``r`` row of ``U`` and maps it through ``V``.

    Attributes
    ----------
    u : Parameter of shape (num_embeddings, rank)
    v : Parameter of shape (rank, embedding_dim)
    padding_idx : int or None
        Kept from the dense embedding (its row of ``U`` receives no gradient).
    """

    accepts = "nn.Embedding"

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, padding_idx: int | None = None, *, device=None, dtype=None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        factory = {"device": device, "dtype": dtype}
        self.num_embeddings, self.embedding_dim, self.rank, self.padding_idx = num_embeddings, embedding_dim, rank, padding_idx
        self.u = nn.Parameter(torch.zeros(num_embeddings, rank, **factory))
        self.v = nn.Parameter(torch.zeros(rank, embedding_dim, **factory))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.u, self.padding_idx) @ self.v

    @classmethod
    def _check_dense(cls, dense: nn.Module) -> None:
        super()._check_dense(dense)
        if dense.max_norm is not None or dense.sparse:
            raise ValueError("embeddings with max_norm or sparse gradients cannot be factorized")

    @classmethod
    def from_factors(cls, dense: nn.Embedding, left: torch.Tensor, right: torch.Tensor) -> "LowRankEmbedding":
        """Replace ``dense`` by ``left`` (num_embeddings, r) @ ``right`` (r, embedding_dim)."""
        cls._check_dense(dense)
        if left.ndim == 3 and right.ndim == 3 and left.shape[0] == right.shape[0] == 1:
            left, right = left[0], right[0]
        if left.ndim != 2 or right.ndim != 2 or right.shape[0] != left.shape[1]:
            raise ValueError(f"factor shapes do not chain: left {tuple(left.shape)}, right {tuple(right.shape)}")
        if (left.shape[0], right.shape[1]) != tuple(dense.weight.shape):
            raise ValueError(f"factors give a {left.shape[0]}x{right.shape[1]} table, the embedding is {tuple(dense.weight.shape)}")
        layer = cls(left.shape[0], right.shape[1], left.shape[1], dense.padding_idx, device=left.device, dtype=left.dtype)
        with torch.no_grad():
            layer.u.copy_(left)
            layer.v.copy_(right.to(left))
        return layer

    def spec(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "rank": self.rank, "num_embeddings": self.num_embeddings,
                "embedding_dim": self.embedding_dim, "padding_idx": self.padding_idx}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], dense: nn.Embedding, *, name: str = "") -> "LowRankEmbedding":
        rank = _field(spec, "rank", int, name)
        saved = (_field(spec, "num_embeddings", int, name), _field(spec, "embedding_dim", int, name))
        if saved != tuple(dense.weight.shape):
            raise _mismatch(name, spec, f"{saved[0]} x {saved[1]}", tuple(dense.weight.shape), dense)
        return cls(saved[0], saved[1], rank, dense.padding_idx, device=dense.weight.device, dtype=dense.weight.dtype)

    def to_dense(self) -> nn.Embedding:
        """The equivalent ``nn.Embedding``."""
        work = torch.promote_types(self.u.dtype, torch.float32)
        dense = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, device=self.u.device, dtype=self.u.dtype)
        with torch.no_grad():
            dense.weight.copy_((self.u.to(work) @ self.v.to(work)).to(self.u.dtype))
        return dense

    def extra_repr(self) -> str:
        dense = self.num_embeddings * self.embedding_dim
        factored = self.rank * (self.num_embeddings + self.embedding_dim)
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}, params={factored:,} vs {dense:,} dense ({_saving(dense, factored)})"
