"""Whitening transforms from second-moment (Gram) statistics.

A layer's input Gram ``G = E[x x^T]`` factors as ``G = L L^T``; then for any weight change
``E``, ``E[||E x||^2] = ||E L||_F^2``, so truncating the SVD of ``W L`` minimizes the layer's
mean squared output error on the data (SVD-LLM, arXiv:2403.07378). The same holds on the output
side with the Gram of output gradients.
"""

from __future__ import annotations

import torch

__all__ = ["cholesky_factor"]


def cholesky_factor(G: torch.Tensor, *, damping: float, max_damping: float = 1e-1) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor of ``G + d * mean(diag G) * I`` with escalating damping ``d``.

    Parameters
    ----------
    G : Tensor of shape (d, d)
        Symmetric positive semi-definite; factorized in float64.
    damping : float
        First relative damping tried; multiplied by 10 after each failure.
    max_damping : float
        Give up above this.

    Returns
    -------
    L : Tensor of shape (d, d), float64
    damping : float
        The damping that worked.

    Raises
    ------
    ValueError
        If ``G`` holds NaN or infinite values.
    torch.linalg.LinAlgError
        If ``G`` is zero, or even ``max_damping`` does not make it positive definite.
    """
    G = G.to(torch.float64)
    if not bool(torch.isfinite(G).all()):
        raise ValueError(f"the Gram matrix ({G.shape[0]}x{G.shape[1]}) holds {int((~torch.isfinite(G)).sum())} non-finite values")
    scale = float(G.diagonal().mean())
    if not scale > 0:
        raise torch.linalg.LinAlgError("the Gram matrix is zero: the layer saw only zero inputs")
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    d = damping
    while d <= max_damping * (1 + 1e-9):
        L, info = torch.linalg.cholesky_ex(G + d * scale * eye)
        if int(info) == 0:
            return L, d
        d *= 10
    raise torch.linalg.LinAlgError(f"Cholesky failed even with damping {max_damping:g}")
