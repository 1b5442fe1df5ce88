"""Matrices with a known spectrum, shared by the linalg tests (one builder, not one per file)."""

from __future__ import annotations

import numpy as np
import torch


def orthonormal(rng: np.random.Generator, m: int, r: int) -> np.ndarray:
    """Haar-random (m, r) matrix with orthonormal columns."""
    return np.linalg.qr(rng.standard_normal((m, r)))[0]


def with_spectrum(s: np.ndarray, m: int, n: int, rng: np.random.Generator | int) -> np.ndarray:
    """Float64 ``U diag(s) V^T`` with Haar-random orthonormal U (m, r) and V (n, r), ``r = len(s)``."""
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    r = len(s)
    U = orthonormal(rng, m, r)
    V = orthonormal(rng, n, r)
    return (U * s) @ V.T


def spectrum_tensor(s: np.ndarray, m: int, n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:func:`with_spectrum` as a tensor of ``dtype``."""
    return torch.from_numpy(with_spectrum(s, m, n, seed)).to(dtype)


def power_law(r: int, alpha: float) -> np.ndarray:
    """``s_i = i**-alpha``, i = 1..r (trained weights decay like alpha ~ 0.7)."""
    return np.arange(1, r + 1, dtype=np.float64) ** -alpha


def decaying(m: int, n: int, seed: int = 0, alpha: float = 1.0) -> np.ndarray:
    """Float64 (m, n) matrix with singular values ``i**-alpha``."""
    return with_spectrum(power_law(min(m, n), alpha), m, n, seed)


def optimal_error(s: np.ndarray, k: int) -> float:
    """Eckart-Young: the smallest Frobenius error of a rank-k approximation, ``sqrt(sum_{i>k} s_i**2)``."""
    return float(np.sqrt(np.sum(np.asarray(s, dtype=np.float64)[k:] ** 2)))
