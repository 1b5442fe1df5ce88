"""``LowRankLinear``: a rank-``r`` stand-in for ``nn.Linear`` or transformers' ``Conv1D``."""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ...views import is_conv1d, weight_matrix
from .base import LowRankLayer, spec_field, spec_mismatch, saving_label, register_low_rank
from .lazy_weight import lazy_weight

__all__ = ["LowRankLinear"]


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
    weight : Tensor of shape (out_features, in_features), or (in_features, out_features) for a Conv1D
        The dense weight the layer computes, in its source's layout, for code written for the
        dense layer (T5's feed-forward reads ``wo.weight.dtype`` in its forward): ``U V`` is
        multiplied out only when an operation reads its values (see
        :mod:`~svdkit.layers.lowrank.lazy_weight`).
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
        rank = spec_field(spec, "rank", int, name)
        saved = (spec_field(spec, "out_features", int, name), spec_field(spec, "in_features", int, name))
        base = tuple(weight_matrix(dense).shape)
        if saved != base:
            raise spec_mismatch(name, spec, f"out, in = {saved}", f"out, in = {base}", dense)
        has_bias = spec_field(spec, "bias", bool, name)
        if has_bias != (getattr(dense, "bias", None) is not None):
            raise spec_mismatch(name, spec, f"bias={has_bias}", f"bias={not has_bias}", dense)
        W = dense.weight
        return cls(saved[1], saved[0], rank, has_bias, source_kind="conv1d" if is_conv1d(dense) else "linear",
                   device=W.device, dtype=W.dtype)

    def dense_weight(self) -> torch.Tensor:
        """The dense matrix ``U V``, shape (out_features, in_features), computed in float32 or wider."""
        work = torch.promote_types(self.u.dtype, torch.float32)
        return (self.u.to(work) @ self.v.to(work)).to(self.u.dtype)

    @property
    def weight(self) -> torch.Tensor:
        if self.source_kind == "conv1d":  # a Conv1D stores its weight as (in, out)
            return lazy_weight(lambda: self.dense_weight().T, (self.in_features, self.out_features), (self.u, self.v))
        return lazy_weight(self.dense_weight, (self.out_features, self.in_features), (self.u, self.v))

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
            f"bias={self.bias is not None}, params={factored:,} vs {dense:,} dense ({saving_label(dense, factored)})"
        )


