"""Streamed, centred covariance in float64 with mergeable accumulators, and linear CKA.

:class:`CovarianceAccumulator` keeps the count ``n``, the mean ``mu`` (d,) and the centred
scatter ``M2 = sum (x - mu)(x - mu)^T`` (d, d). Each batch is centred on its own mean before its
scatter is formed, and batches (or accumulators filled elsewhere) are merged with the update of
Chan, Golub & LeVeque (1979)::

    n = n_a + n_b,  delta = mu_b - mu_a,
    mu = mu_a + delta * n_b / n,   M2 = M2_a + M2_b + delta delta^T * n_a n_b / n

This avoids the catastrophic cancellation of ``X^T X - n mu mu^T`` when ``|mu| >> sigma``
(transformer hidden states have a few huge mean channels). Memory is O(d^2), whatever the
number of samples.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["CovarianceAccumulator", "cka_from_scatter", "linear_cka"]


def _scatter(X: torch.Tensor) -> torch.Tensor:
    """``X^T X`` for (N, d) float64, on torch's BLAS: the same threads as the model's forward (a
    second thread pool, NumPy's, would contend with them on a busy machine)."""
    return X.T @ X


class CovarianceAccumulator:
    """Running mean and centred scatter of d-dimensional samples, in float64.

    Parameters
    ----------
    dim : int
        Feature dimension ``d``.
    device : str or torch.device
        Where the (d, d) scatter lives.

    Attributes
    ----------
    n : int
        Samples seen.
    mean : Tensor of shape (d,)
    M2 : Tensor of shape (d, d)
        Centred scatter ``sum (x - mean)(x - mean)^T``.
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = int(dim)
        self.n = 0
        self.mean = torch.zeros(self.dim, dtype=torch.float64, device=device)
        self.M2 = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=device)

    def update(self, X: torch.Tensor) -> "CovarianceAccumulator":
        """Add samples ``X`` of shape (N, d); returns self."""
        if X.ndim != 2 or X.shape[1] != self.dim:
            raise ValueError(f"expected samples of shape (N, {self.dim}), got {tuple(X.shape)}")
        if X.shape[0] == 0:
            return self
        Xd = X.detach().to(self.M2.device, torch.float64)
        mu = Xd.mean(dim=0)
        return self._merge(Xd.shape[0], mu, _scatter(Xd - mu))

    def merge(self, other: "CovarianceAccumulator") -> "CovarianceAccumulator":
        """Fold another accumulator's samples into this one (in place); returns self."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge a {other.dim}-dimensional accumulator into a {self.dim}-dimensional one")
        if other.n == 0:
            return self
        return self._merge(other.n, other.mean.to(self.mean.device), other.M2.to(self.M2.device))

    def _merge(self, n_b: int, mu_b: torch.Tensor, M2_b: torch.Tensor) -> "CovarianceAccumulator":
        n_a = self.n
        n = n_a + n_b
        delta = mu_b - self.mean
        self.M2 += M2_b
        if n_a > 0:
            self.M2 += torch.outer(delta, delta) * (n_a * n_b / n)
        self.mean += delta * (n_b / n)
        self.n = n
        return self

    def covariance(self, ddof: int = 1) -> torch.Tensor:
        """``M2 / (n - ddof)``, shape (d, d).

        Raises
        ------
        ValueError
            With ``n <= ddof`` samples.
        """
        if self.n <= ddof:
            raise ValueError(f"a covariance with ddof={ddof} needs more than {ddof} samples, got {self.n}")
        return self.M2 / (self.n - ddof)

    def second_moment(self) -> torch.Tensor:
        """Uncentred ``sum x x^T``, shape (d, d)."""
        return self.M2 + self.n * torch.outer(self.mean, self.mean)

    def block(self, rows: slice, cols: slice) -> torch.Tensor:
        """A block of the centred scatter (for accumulators over concatenated features)."""
        return self.M2[rows, cols]


def cka_from_scatter(Sxy: torch.Tensor, Sxx: torch.Tensor, Syy: torch.Tensor) -> float:
    """Linear CKA from centred scatter blocks: ``||Sxy||_F^2 / (||Sxx||_F ||Syy||_F)``.

    Parameters
    ----------
    Sxy : Tensor of shape (dx, dy)
    Sxx : Tensor of shape (dx, dx)
    Syy : Tensor of shape (dy, dy)

    Returns
    -------
    float in [0, 1]; NaN when either representation is constant.
    """
    den = float(torch.linalg.matrix_norm(Sxx)) * float(torch.linalg.matrix_norm(Syy))
    if den == 0:
        return float("nan")
    return float(torch.linalg.matrix_norm(Sxy)) ** 2 / den


def _as_f64(A: Any) -> torch.Tensor:
    if isinstance(A, torch.Tensor):
        return A.detach().to(torch.float64)
    return torch.as_tensor(np.asarray(A, dtype=np.float64))


def linear_cka(X: Any, Y: Any) -> float:
    """Linear centred kernel alignment of two representations of the same samples.

    Parameters
    ----------
    X : Tensor or ndarray of shape (N, dx)
    Y : Tensor or ndarray of shape (N, dy)

    Returns
    -------
    float
        ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred ``Xc, Yc``
        (Kornblith et al., ICML 2019): 1 for representations equal up to rotation and isotropic
        scaling, near 0 for unrelated ones.

    Raises
    ------
    ValueError
        For different sample counts or fewer than 2 samples.
    """
    Xt = _as_f64(X)
    Yt = _as_f64(Y).to(Xt.device)
    if Xt.ndim != 2 or Yt.ndim != 2:
        raise ValueError(f"expected two (N, d) matrices, got shapes {tuple(Xt.shape)} and {tuple(Yt.shape)}")
    if Xt.shape[0] != Yt.shape[0] or Xt.shape[0] < 2:
        raise ValueError(f"CKA needs the same >= 2 samples in both: got {Xt.shape[0]} and {Yt.shape[0]}")
    Xc = Xt - Xt.mean(dim=0)
    Yc = Yt - Yt.mean(dim=0)
    return cka_from_scatter(Xc.T @ Yc, Xc.T @ Xc, Yc.T @ Yc)
