"""``LowRankConv2d``: a ``kh x kw`` convolution to ``r`` channels per group, then a 1x1 one."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from .base import LowRankLayer, spec_field, spec_mismatch, saving_label, register_low_rank
from .lazy_weight import lazy_weight

__all__ = ["LowRankConv2d"]


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
    weight : Tensor of shape (C_out, C_in / groups, kh, kw)
        The dense kernel the pair computes, for code written for ``nn.Conv2d`` (ViT and CLIP
        read their patch projection's ``weight.dtype`` in their forward): the factors are
        multiplied out only when an operation reads its values (see
        :mod:`~svdkit.layers.lowrank.lazy_weight`).
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
        rank = spec_field(spec, "rank", int, name)
        saved = (spec_field(spec, "in_channels", int, name), spec_field(spec, "out_channels", int, name),
                 tuple(spec_field(spec, "kernel_size", list, name)), spec_field(spec, "groups", int, name))
        base = (dense.in_channels, dense.out_channels, tuple(dense.kernel_size), dense.groups)
        if saved != base:
            raise spec_mismatch(name, spec, f"in, out, kernel, groups = {saved}", f"{base}", dense)
        return cls(dense, rank)

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """The dense kernel's shape, (C_out, C_in / groups, kh, kw)."""
        return (self.out_channels, self.in_channels // self.groups, *self.reduce.kernel_size)

    def dense_weight(self) -> torch.Tensor:
        """The dense kernel, shape :attr:`kernel_shape`, computed in float32 or wider."""
        r, g = self.reduce, self.groups
        work = torch.promote_types(r.weight.dtype, torch.float32)
        left = self.expand.weight.to(work).reshape(g, self.out_channels // g, self.rank)
        right = r.weight.to(work).reshape(g, self.rank, -1)
        return (left @ right).reshape(self.kernel_shape).to(r.weight.dtype)

    @property
    def weight(self) -> torch.Tensor:
        return lazy_weight(self.dense_weight, self.kernel_shape, (self.expand.weight, self.reduce.weight))

    def to_dense(self) -> nn.Conv2d:
        """The equivalent dense ``nn.Conv2d``."""
        r, g = self.reduce, self.groups
        dense = nn.Conv2d(
            r.in_channels, self.out_channels, r.kernel_size, stride=r.stride, padding=r.padding, dilation=r.dilation,
            groups=g, bias=self.expand.bias is not None, padding_mode=r.padding_mode,
            device=r.weight.device, dtype=r.weight.dtype,
        )
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight())
            if self.expand.bias is not None:
                dense.bias.copy_(self.expand.bias)
        return dense

    def extra_repr(self) -> str:
        kh, kw = self.reduce.kernel_size
        dense = self.out_channels * (self.in_channels // self.groups) * kh * kw
        factored = sum(p.numel() for p in (self.reduce.weight, self.expand.weight))
        return f"rank={self.rank}, groups={self.groups}, params={factored:,} vs {dense:,} dense ({saving_label(dense, factored)})"


