"""Factorized layers: a dense weight ``W ~= U V`` applied as two thin products.

``LowRankLinear`` replaces ``nn.Linear`` or transformers' ``Conv1D``; ``LowRankConv2d`` replaces
``nn.Conv2d``. Both convert both ways (``from_dense`` / ``to_dense``), run the factors in
``forward`` without rebuilding ``W``, and keep bias, dtype and device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..linalg import RankLike, resolve_rank, svd
from ..views import is_conv1d, weight_matrix

__all__ = ["LowRankConv2d", "LowRankEmbedding", "LowRankLinear", "balanced_factors", "grouped_matrices"]


def balanced_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``U diag(S) Vh`` as ``(U sqrt(S)) (sqrt(S) Vh)`` so both factors are equally scaled.

    Parameters
    ----------
    U : Tensor of shape (..., m, k)
    S : Tensor of shape (..., k)
    Vh : Tensor of shape (..., k, n)

    Returns
    -------
    left : Tensor of shape (..., m, k)
    right : Tensor of shape (..., k, n)
    """
    root = S.clamp_min(0).sqrt()
    return U * root.unsqueeze(-2), root.unsqueeze(-1) * Vh


def _saving(dense: int, factored: int) -> str:
    return f"{1 - factored / dense:+.0%}".replace("+", "-", 1) if factored <= dense else f"+{factored / dense - 1:.0%}"


class LowRankLinear(nn.Module):
    """``y = (x V^T) U^T + b``: a rank-``r`` stand-in for a dense ``out x in`` Linear.

    Parameters
    ----------
    in_features, out_features, rank : int
    bias : bool
    device, dtype : optional

    Attributes
    ----------
    u : Parameter of shape (out_features, rank)
    v : Parameter of shape (rank, in_features)
    bias : Parameter of shape (out_features,) or None
    source_kind : {"linear", "conv1d"}
        What :meth:`to_dense` rebuilds.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *, device=None, dtype=None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.u = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.v = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        self.source_kind = "linear"
        nn.init.normal_(self.u, std=rank ** -0.5)
        nn.init.normal_(self.v, std=in_features ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.v), self.u, self.bias)

    @classmethod
    def from_factors(cls, left: torch.Tensor, right: torch.Tensor, bias: torch.Tensor | None = None) -> "LowRankLinear":
        """Build from ``left`` (out, r) and ``right`` (r, in); dtype and device follow ``left``."""
        if left.ndim != 2 or right.ndim != 2 or right.shape[0] != left.shape[1]:
            raise ValueError(f"factor shapes do not chain: left {tuple(left.shape)}, right {tuple(right.shape)}")
        (out_features, rank), in_features = left.shape, right.shape[1]
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias of shape {tuple(bias.shape)} does not match left {tuple(left.shape)}: expected ({out_features},)")
        layer = cls(in_features, out_features, rank, bias is not None, device=left.device, dtype=left.dtype)
        with torch.no_grad():
            layer.u.copy_(left)
            layer.v.copy_(right.to(left))
            if bias is not None:
                layer.bias.copy_(bias.to(left))
        return layer

    @classmethod
    def from_dense(cls, layer: nn.Module, rank: RankLike) -> "LowRankLinear":
        """Truncated SVD of a Linear (or Conv1D) weight, computed in float64.

        Parameters
        ----------
        layer : nn.Linear or transformers Conv1D
        rank : int or RankSpec
            Resolved against the weight's singular values.
        """
        if not (isinstance(layer, nn.Linear) or is_conv1d(layer)):
            raise TypeError(f"LowRankLinear.from_dense takes nn.Linear or Conv1D, got {type(layer).__name__}")
        W = weight_matrix(layer).detach()
        U, S, Vh = svd(W.double())
        k = resolve_rank(S, rank, tuple(W.shape))
        left, right = balanced_factors(U[:, :k], S[:k], Vh[:k])
        bias = layer.bias.detach() if layer.bias is not None else None
        out = cls.from_factors(left.to(W.dtype), right.to(W.dtype), bias)
        out.source_kind = "conv1d" if is_conv1d(layer) else "linear"
        return out

    def weight(self) -> torch.Tensor:
        """The dense matrix ``U V``, shape (out_features, in_features), computed in float32 or wider."""
        work = torch.promote_types(self.u.dtype, torch.float32)
        return (self.u.to(work) @ self.v.to(work)).to(self.u.dtype)

    def to_dense(self) -> nn.Module:
        """The equivalent dense layer: ``nn.Linear``, or transformers ``Conv1D`` if that was the source."""
        W = self.weight().detach()
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


class LowRankConv2d(nn.Module):
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
    def from_factors(cls, conv: nn.Conv2d, left: torch.Tensor, right: torch.Tensor) -> "LowRankConv2d":
        """Build from per-group factors of ``conv``'s matrix view.

        Parameters
        ----------
        conv : nn.Conv2d
            The dense layer (geometry and bias are taken from it).
        left : Tensor of shape (groups, C_out / groups, r)
        right : Tensor of shape (groups, r, C_in / groups * kh * kw)
        """
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

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, rank: RankLike) -> "LowRankConv2d":
        """Truncated SVD of each group's ``(C_out/g, C_in/g * kh * kw)`` matrix, in float64.

        A rank spec is resolved on the first group's spectrum and applied to every group.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"LowRankConv2d.from_dense takes nn.Conv2d, got {type(conv).__name__}")
        blocks = grouped_matrices(conv)
        U, S, Vh = svd(blocks.double())
        k = resolve_rank(S[0], rank, tuple(blocks.shape[1:]))
        left, right = balanced_factors(U[..., :k], S[..., :k], Vh[..., :k, :])
        return cls.from_factors(conv, left.to(conv.weight.dtype), right.to(conv.weight.dtype))

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


def _pair(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def grouped_matrices(conv: nn.Conv2d) -> torch.Tensor:
    """A Conv2d weight as one matrix per group, shape (groups, C_out / groups, C_in / groups * kh * kw)."""
    W = weight_matrix(conv).detach()
    return W.reshape(conv.groups, conv.out_channels // conv.groups, W.shape[1])


class LowRankEmbedding(nn.Module):
    """``E ~= U V``: each token looks up a rank-``r`` row of ``U`` and maps it through ``V``.

    Attributes
    ----------
    u : Parameter of shape (num_embeddings, rank)
    v : Parameter of shape (rank, embedding_dim)
    padding_idx : int or None
        Kept from the dense embedding (its row of ``U`` receives no gradient).
    """

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
    def from_factors(cls, left: torch.Tensor, right: torch.Tensor, padding_idx: int | None = None) -> "LowRankEmbedding":
        """Build from ``left`` (num_embeddings, r) and ``right`` (r, embedding_dim)."""
        if left.ndim != 2 or right.ndim != 2 or right.shape[0] != left.shape[1]:
            raise ValueError(f"factor shapes do not chain: left {tuple(left.shape)}, right {tuple(right.shape)}")
        layer = cls(left.shape[0], right.shape[1], left.shape[1], padding_idx, device=left.device, dtype=left.dtype)
        with torch.no_grad():
            layer.u.copy_(left)
            layer.v.copy_(right.to(left))
        return layer

    @classmethod
    def from_dense(cls, embedding: nn.Embedding, rank: RankLike) -> "LowRankEmbedding":
        """Truncated SVD of the embedding table, in float64."""
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"LowRankEmbedding.from_dense takes nn.Embedding, got {type(embedding).__name__}")
        if embedding.max_norm is not None or embedding.sparse:
            raise ValueError("embeddings with max_norm or sparse gradients cannot be factorized")
        E = embedding.weight.detach()
        U, S, Vh = svd(E.double())
        k = resolve_rank(S, rank, tuple(E.shape))
        left, right = balanced_factors(U[:, :k], S[:k], Vh[:k])
        return cls.from_factors(left.to(E.dtype), right.to(E.dtype), embedding.padding_idx)

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
