"""``LowRankEmbedding``: an embedding table as a rank-``r`` product."""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .base import LowRankLayer, spec_field, spec_mismatch, saving_label, register_low_rank

__all__ = ["LowRankEmbedding"]


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
    def refusal(cls, dense: nn.Module) -> str | None:
        if getattr(dense, "max_norm", None) is not None or getattr(dense, "sparse", False):
            return "embeddings with max_norm or sparse gradients are not factorized"
        return None

    @classmethod
    def _check_dense(cls, dense: nn.Module) -> None:
        super()._check_dense(dense)
        reason = cls.refusal(dense)
        if reason is not None:
            raise ValueError(reason)

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
        rank = spec_field(spec, "rank", int, name)
        saved = (spec_field(spec, "num_embeddings", int, name), spec_field(spec, "embedding_dim", int, name))
        if saved != tuple(dense.weight.shape):
            raise spec_mismatch(name, spec, f"{saved[0]} x {saved[1]}", tuple(dense.weight.shape), dense)
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
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}, params={factored:,} vs {dense:,} dense ({saving_label(dense, factored)})"
