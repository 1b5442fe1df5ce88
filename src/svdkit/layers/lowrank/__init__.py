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
  rebuilds ``W``; ``LowRankLinear`` and ``LowRankConv2d`` answer ``weight`` (read by code written
  for the dense layer) with ``W`` multiplied out only when its values are read
  (:mod:`~svdkit.layers.lowrank.lazy_weight`).

A module type registered with :func:`svdkit.views.register_view` under an existing kind is
factorized by that kind's class; a new kind needs a class registered with
:func:`register_low_rank`.
"""

from .base import LowRankLayer, grouped_matrices, low_rank_class, low_rank_from_spec, low_rank_types, register_low_rank
from .conv2d import LowRankConv2d
from .embedding import LowRankEmbedding
from .linear import LowRankLinear

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
