"""Whitening transforms from second-moment (Gram) statistics.

A layer's input Gram ``G = E[x x^T]`` factors as ``G = L L^T``; then for any weight change
``E``, ``E[||E x||^2] = ||E L||_F^2``, so truncating the SVD of ``W L`` minimizes the layer's
mean squared output error on the data (SVD-LLM, arXiv:2403.07378). The same holds on the output
side with the Gram of output gradients.
"""

from __future__ import annotations

import math

import torch

__all__ = ["SMALLEST_DAMPING", "cholesky_factor"]

#: The damping tried after a damping of 0 fails: a relative ``1e-12`` lifts a semi-definite Gram's
#: zero eigenvalues above float64 rounding of its other entries for widths up to a few thousand.
SMALLEST_DAMPING = 1e-12


def cholesky_factor(G: torch.Tensor, *, damping: float, max_damping: float = 1e-1) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor of ``G + d * mean(diag G) * I`` with escalating damping ``d``.

    Parameters
    ----------
    G : Tensor of shape (d, d)
        Symmetric positive semi-definite; factorized in float64.
    damping : float
        First relative damping tried (always tried, even above ``max_damping``); multiplied by 10
        after each failure (a damping of 0 is followed by :data:`SMALLEST_DAMPING`).
    max_damping : float
        Give up when the next damping would exceed this (or ``damping``, if larger).

    Returns
    -------
    L : Tensor of shape (d, d), float64
    damping : float
        The damping that worked.

    Raises
    ------
    ValueError
        If ``G`` holds NaN or infinite values, or ``damping`` is negative or not finite.
    torch.linalg.LinAlgError
        If ``G`` is zero, or even the largest damping allowed does not make it positive definite.
    """
    if not (math.isfinite(damping) and damping >= 0):
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    G = G.to(torch.float64)
    if not bool(torch.isfinite(G).all()):
        raise ValueError(f"the Gram matrix ({G.shape[0]}x{G.shape[1]}) holds {int((~torch.isfinite(G)).sum())} non-finite values")
    scale = float(G.diagonal().mean())
    if not scale > 0:
        raise torch.linalg.LinAlgError("the Gram matrix is zero: the layer saw only zero inputs")
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    largest = max(max_damping, damping) * (1 + 1e-9)
    d = damping
    while True:
        L, info = torch.linalg.cholesky_ex(G + d * scale * eye)
        if int(info) == 0:
            return L, d
        following = d * 10 if d > 0 else SMALLEST_DAMPING
        if following > largest:
            raise torch.linalg.LinAlgError(f"Cholesky failed even with damping {d:g}")
        d = following
