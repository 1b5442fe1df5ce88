"""WeightWatcher's Marchenko-Pastur fit of an ESD, reproduced (``mp_fit=True`` in its ``analyze()``).

The columns it fills (``sigma_mp``, ``bulk_min``, ``bulk_max``, ``num_spikes``, ``mp_softrank``,
``w_scale``) bear WeightWatcher's names, so they carry its meaning, computed its way
(``weightwatcher.py`` ``mp_fit``, ``RMT_Util.py`` ``fit_density_with_range`` and ``resid_mp``):

1. rescale the ESD to mean 1: ``W_scale = sqrt(n / sum(lambda))`` over its ``n`` eigenvalues;
2. estimate its density with a linear-kernel KDE of bandwidth 0.1 on 1000 points of
   ``[0, max + 0.5]`` (the square roots of the eigenvalues, for a square matrix, ``Q = 1``), and keep
   the points where it exceeds 0.01;
3. choose ``sigma`` minimising the squared distance between that density and the
   Marchenko-Pastur law of aspect ratio ``Q = N / M`` (the quarter-circle law when ``Q = 1``):
   a grid from ``0.05 s`` to ``2 s`` in steps of ``0.01 s``, with ``s = sqrt(lambda_max) /
   (1 + Q**-0.5)``, then SciPy's Nelder-Mead from the best grid point (``scipy.optimize.brute``);
   a ``sigma`` whose bulk edge ``b`` lies below the density's peak or beyond the grid, or whose
   lower edge ``a`` lies above the peak, scores 1000 per point;
4. ``bulk_max = (sigma (1 + Q**-0.5))**2``, ``bulk_min = (sigma (1 - Q**-0.5))**2``; a spike must
   exceed ``bulk_max + sqrt(TW)``, ``TW = Q**-0.5 bulk_max**(2/3) M**(-2/3)``;
   ``mp_softrank = bulk_max / lambda_max``, all in rescaled units; ``bulk_min`` and ``bulk_max``
   are then reported in the ESD's own units (divided by ``W_scale**2``), as WeightWatcher does.

The KDE is evaluated once, exactly, with prefix sums (WeightWatcher refits scikit-learn's at
every trial ``sigma``), so the fit costs milliseconds. SciPy is needed (``pip install scipy``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["MPFit", "fit_marchenko_pastur", "linear_kde"]

_BANDWIDTH = 0.1
_GRID = 1000
_DENSITY_FLOOR = 0.01
_PENALTY = 1000.0


@dataclass(frozen=True)
class MPFit:
    """WeightWatcher's Marchenko-Pastur fit of one ESD.

    Attributes
    ----------
    sigma_mp : float
        Element scale of the random bulk, in units of the rescaled ESD (mean eigenvalue 1).
    bulk_min, bulk_max : float
        Bulk edges ``(sigma_mp (1 -/+ Q**-0.5))**2``, in the ESD's own units.
    num_spikes : int
        Eigenvalues above ``bulk_max`` plus the Tracy-Widom margin.
    mp_softrank : float
        ``bulk_max / lambda_max``: near 1 for a random matrix, near 0 when one direction dominates.
    w_scale : float
        WeightWatcher's ``W_scale``: the ESD times ``w_scale**2`` has mean 1.
    """

    sigma_mp: float
    bulk_min: float
    bulk_max: float
    num_spikes: int
    mp_softrank: float
    w_scale: float

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return asdict(self)


def linear_kde(samples: np.ndarray, grid: np.ndarray, bandwidth: float = _BANDWIDTH) -> np.ndarray:
    """Density of ``samples`` at ``grid`` with the linear (triangular) kernel, exactly.

    ``(1 / (n h)) sum_i max(0, 1 - |g - x_i| / h)``: scikit-learn's ``KernelDensity(kernel="linear")``
    in one dimension, from prefix sums of the sorted samples (O((n + g) log n)).

    Parameters
    ----------
    samples : ndarray of shape (n,)
    grid : ndarray of shape (g,)
    bandwidth : float
    """
    x = np.sort(np.asarray(samples, dtype=np.float64))
    h = float(bandwidth)
    prefix = np.concatenate([[0.0], np.cumsum(x)])
    lo = np.searchsorted(x, grid - h, side="right")  # first x > g - h
    mid = np.searchsorted(x, grid, side="right")  # first x > g
    hi = np.searchsorted(x, grid + h, side="left")  # first x >= g + h
    n_left, s_left = mid - lo, prefix[mid] - prefix[lo]  # g - h < x <= g: 1 - (g - x)/h
    n_right, s_right = hi - mid, prefix[hi] - prefix[mid]  # g < x < g + h: 1 - (x - g)/h
    total = n_left - (grid * n_left - s_left) / h + n_right - (s_right - grid * n_right) / h
    return np.maximum(total, 0.0) / (x.size * h)


def _mp_density(x: np.ndarray, Q: float, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """WeightWatcher's ``marchenko_pastur_fun`` for trial sigmas (k,) at points (g,): (k, g), a, b."""
    y = 1.0 / Q
    s = sigma[:, None]
    b = (s * (1 + math.sqrt(y))) ** 2
    a = (s * (1 - math.sqrt(y))) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        val = np.nan_to_num((1 / (2 * np.pi * s * s * x[None, :] * y)) * np.sqrt((b - x[None, :]) * (x[None, :] - a)))
    return val, a[:, 0], b[:, 0]


def _quarter_circle(x: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """WeightWatcher's ``quarter_circle_fun`` (its ``sqrt(4 - x**2)`` ignores sigma, as there)."""
    s = sigma[:, None]
    with np.errstate(invalid="ignore"):
        return np.nan_to_num((1 / (np.pi * s * s)) * np.sqrt(4 - x[None, :] ** 2))


def _residual(Q: float, xde: np.ndarray, yde: np.ndarray):
    peak = xde[int(np.argmax(yde))]
    top = float(xde.max())

    def residual(sigma) -> float:
        s = np.atleast_1d(np.asarray(sigma, dtype=np.float64)).ravel()[:1]
        if Q == 1:
            return float(np.sum((_quarter_circle(xde, s)[0] - yde) ** 2))
        val, a, b = _mp_density(xde, Q, s)
        if b[0] < peak or b[0] > top or a[0] > peak:
            return _PENALTY**2 * xde.size
        return float(np.sum((val[0] - yde) ** 2))

    return residual


def fit_marchenko_pastur(evals: Any, Q: float, M: int | None = None) -> MPFit:
    """Fit the Marchenko-Pastur bulk of an ESD the way WeightWatcher does (module docstring).

    Parameters
    ----------
    evals : array-like or Tensor of shape (n,)
        Eigenvalues ``lambda = s**2`` of a matrix (pooled Conv2d slices included).
    Q : float
        ``N / M >= 1``: larger over smaller dimension of the matrix (of one Conv2d slice).
    M : int, optional
        The smaller dimension, for the Tracy-Widom margin; default ``len(evals)``.

    Returns
    -------
    MPFit

    Raises
    ------
    ValueError
        For ``Q < 1``, no positive eigenvalue or non-finite values.
    ImportError
        Without SciPy.
    """
    if hasattr(evals, "detach"):
        evals = evals.detach().cpu().double().numpy()
    x = np.asarray(evals, dtype=np.float64).ravel()
    if not Q >= 1:
        raise ValueError(f"the aspect ratio Q = N/M must be >= 1, got {Q}")
    if x.size == 0 or not np.isfinite(x).all() or not x.max() > 0:
        raise ValueError(f"the MP fit needs finite eigenvalues with a positive one; got {x.size} values, max {x.max() if x.size else None}")
    try:
        from scipy import optimize
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the Marchenko-Pastur fit (mp_fit=True) needs SciPy, as WeightWatcher's does: pip install scipy") from exc
    M = x.size if M is None else int(M)
    w_scale = math.sqrt(x.size) / math.sqrt(float(x.sum()))
    lam = x * w_scale**2
    lam_max = float(lam.max())
    to_fit = np.sqrt(lam) if Q == 1 else lam
    xde = np.linspace(0, float(to_fit.max()) + 0.5, _GRID)
    yde = linear_kde(to_fit, xde)
    good = yde > _DENSITY_FLOOR
    residual = _residual(Q, xde[good], yde[good])
    s = math.sqrt(lam_max / (1 + 1 / math.sqrt(Q)) ** 2)
    best = optimize.brute(residual, (slice(0.05 * s, 2.0 * s, 0.01 * s),), full_output=True)[0]
    sigma = float(np.atleast_1d(best)[0])
    bulk_max = (sigma * (1 + 1 / math.sqrt(Q))) ** 2
    bulk_min = (sigma * (1 - 1 / math.sqrt(Q))) ** 2
    tw = 1 / math.sqrt(Q) * bulk_max ** (2 / 3) * M ** (-2 / 3)
    spikes = int(np.count_nonzero(lam > bulk_max + math.sqrt(tw)))
    return MPFit(
        sigma_mp=sigma,
        bulk_min=bulk_min / w_scale**2,
        bulk_max=bulk_max / w_scale**2,
        num_spikes=spikes,
        mp_softrank=bulk_max / lam_max,
        w_scale=w_scale,
    )
