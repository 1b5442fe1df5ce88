"""Pure tensor math: decompositions, spectrum metrics and the rank vocabulary.

NumPy arrays in give NumPy arrays out; tensors keep their device. Nothing here imports
``torch.nn``.
"""

from .gram import SMALL_EIGENSOLVE, gram_eigenvalues, gram_svd, gram_svdvals, single_threaded
from .randomized import AUTO_MAX_N_ITER, AUTO_TOL, RandomizedSVDInfo, layer_seed, randomized_svd
from .allocation import allocate_ranks, round_rank
from .rank import Energy, ErrorTol, ParamRatio, RankLike, RankRatio, RankSpec, rank_from_dict, resolve_rank
from .spectrum import (
    DEFAULT_VERDICT_ERROR,
    CompressionSuitability,
    break_even_rank,
    compression_suitability,
    condition_number,
    effective_rank,
    energy,
    energy_rank,
    explained_variance_ratio,
    frobenius_norm,
    nuclear_norm,
    numerical_rank,
    participation_ratio,
    spectral_norm,
    stable_rank,
    tail_error,
    verdict_rule,
)
from .svd import SVDFallbackWarning, SVDResult, svd, svd_flip, svdvals
from .whiten import cholesky_factor
from .truncated import SVD_METHODS, SVDMethod, TruncationStats, split_factors, truncated_svd, uses_randomized

__all__ = [
    "AUTO_MAX_N_ITER",
    "AUTO_TOL",
    "CompressionSuitability",
    "DEFAULT_VERDICT_ERROR",
    "Energy",
    "ErrorTol",
    "ParamRatio",
    "RankLike",
    "RankRatio",
    "RandomizedSVDInfo",
    "RankSpec",
    "SVDFallbackWarning",
    "SVDMethod",
    "SVD_METHODS",
    "SVDResult",
    "TruncationStats",
    "allocate_ranks",
    "break_even_rank",
    "cholesky_factor",
    "compression_suitability",
    "condition_number",
    "effective_rank",
    "energy",
    "energy_rank",
    "explained_variance_ratio",
    "frobenius_norm",
    "SMALL_EIGENSOLVE",
    "gram_eigenvalues",
    "gram_svd",
    "gram_svdvals",
    "layer_seed",
    "nuclear_norm",
    "numerical_rank",
    "participation_ratio",
    "randomized_svd",
    "rank_from_dict",
    "resolve_rank",
    "round_rank",
    "single_threaded",
    "spectral_norm",
    "split_factors",
    "stable_rank",
    "svd",
    "svd_flip",
    "svdvals",
    "tail_error",
    "truncated_svd",
    "uses_randomized",
    "verdict_rule",
]
