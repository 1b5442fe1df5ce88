"""Every per-layer metric of a weight table, read from one ESD (the eigenvalues ``lambda = s**2``).

Columns that bear WeightWatcher's names carry WeightWatcher's meaning, computed its way (its
``analyze()`` with ``mp_fit=True``); svdkit's own conventions have names of their own.

===========================  ===========================================================  =====
column                       meaning                                                      WW
===========================  ===========================================================  =====
num_evals                    eigenvalues in the ESD (``M``; ``M * kh * kw`` pooled slices)  yes
norm, log_norm               ``sum(lambda) = ||W||_F**2`` and its log10                   yes
spectral_norm                ``lambda_max = ||W||_2**2`` (the square, as WeightWatcher)   yes
log_spectral_norm            ``log10(lambda_max)``                                        yes
stable_rank                  ``sum(lambda) / lambda_max``                                 yes
alpha, xmin, xmax            power-law fit (:func:`~svdkit.analysis.powerlaw.fit_power_law`) yes
num_pl_spikes                eigenvalues ``>= xmin``                                      yes
alpha_weighted               ``alpha * log10(lambda_max)``                                yes
log_alpha_norm               ``log10(sum(lambda**alpha))``                                yes
warning                      "over-trained" (alpha < 2) / "under-trained" (alpha > 6)     yes
sigma_mp ... w_scale         Marchenko-Pastur fit (``mp_fit=True``; its ``W_scale``)      yes
ks_distance, alpha_sigma     the fit's KS distance ``D`` and ``(alpha - 1) / sqrt(n)``
fit_status                   "success", or why the fit failed or was skipped
sigma_max, sigma_min         largest / smallest singular value (``||W||_2``, not squared)
condition_number             ``sigma_max / sigma_min``
frobenius_norm, nuclear_norm ``||W||_F`` (not squared) and ``sum(s)``
rank, rank_tolerance         numerical rank: ``s > rank_tolerance * sigma_max``
effective_rank               ``exp(H(s / sum(s)))`` (Roy & Vetterli)
top10_energy                 share of ``sum(lambda)`` in the 10 largest values
rank_90, rank_99             smallest rank keeping 90 / 99 % of the energy; ``*_fraction`` over M
verdict_rank ... verdict     svdkit's one compression rule (:func:`svdkit.linalg.compression_suitability`)
===========================  ===========================================================  =====

``rank_tolerance`` is ``max(max(m, n) * eps, sigma_floor)``: numpy's ``matrix_rank`` tolerance
(``eps`` of the weight's dtype, float32's for 16-bit weights) or the eigenvalue route's
resolution, whichever is coarser (:mod:`svdkit.analysis.esd`). ``sigma_min`` and
``condition_number`` are NaN where the route does not resolve ``sigma_min`` to 1 %.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..linalg import DEFAULT_VERDICT_ERROR, compression_suitability
from .marchenko_pastur import fit_marchenko_pastur
from .powerlaw import EVALS_THRESH, fit_power_law

__all__ = ["WW_COLUMNS", "spectrum_metrics", "verdict_columns"]

#: Columns named (and meant) as in WeightWatcher's ``analyze()`` details.
WW_COLUMNS = (
    "num_evals", "norm", "log_norm", "spectral_norm", "log_spectral_norm", "stable_rank", "alpha", "xmin", "xmax",
    "num_pl_spikes", "alpha_weighted", "log_alpha_norm", "warning", "sigma_mp", "bulk_min", "bulk_max",
    "num_spikes", "mp_softrank", "w_scale",
)
_OVER_TRAINED, _UNDER_TRAINED = 2.0, 6.0
_NAN = float("nan")


def _log10(x: float) -> float:
    return math.log10(x) if x > 0 else float("-inf")


def verdict_columns(S: np.ndarray, shape: tuple[int, int], error: float, prefix: str = "") -> dict[str, Any]:
    """``verdict_rank``, ``verdict_params`` and ``verdict`` of svdkit's one rule (with ``prefix``)."""
    judged = compression_suitability(S, shape, error=error)
    return {f"{prefix}verdict_rank": judged.rank, f"{prefix}verdict_params": judged.params_kept, f"{prefix}verdict": judged.verdict}


def spectrum_metrics(
    lam: np.ndarray,
    shape: tuple[int, int],
    *,
    eps: float,
    sigma_floor: float = 0.0,
    exact: bool = True,
    fit: bool = True,
    mp_fit: bool = False,
    mp_shape: tuple[int, int] | None = None,
    error: float | None = DEFAULT_VERDICT_ERROR,
    min_evals: int = 8,
    rank: int | None = None,
) -> dict[str, Any]:
    """Every metric of one ESD (see the module docstring).

    Parameters
    ----------
    lam : ndarray of shape (M,)
        Eigenvalues ``s**2``, descending, float64, ``>= 0``.
    shape : (m, n)
        The matrix shape (for ranks and the verdict).
    eps : float
        Machine epsilon of the weight's dtype (numerical-rank tolerance).
    sigma_floor : float
        Smallest ``s / s_max`` the eigenvalue route resolves (:func:`svdkit.analysis.esd.sigma_floor`).
    exact : bool
        Whether the route is float64-exact; if not, an unresolved ``sigma_min`` is NaN.
    fit, mp_fit : bool
        Run the power-law / Marchenko-Pastur fits.
    mp_shape : (N, M), optional
        Shape whose aspect ratio ``Q = N / M`` the MP fit uses (a Conv2d slice); default ``shape``.
    error : float or None
        Relative error of the verdict rule; None leaves the verdict columns out.
    min_evals : int
        Fewer eigenvalues than this skip the power-law fit (WeightWatcher's ``min_evals``).
    rank : int, optional
        Numerical rank computed elsewhere (pooled Conv2d slices).

    Returns
    -------
    dict
    """
    m, n = int(shape[0]), int(shape[1])
    S = np.sqrt(lam)
    total = float(lam.sum())
    lam_max = float(lam[0])
    s_max = float(S[0])
    M = lam.size
    tolerance = max(max(m, n) * eps, sigma_floor)
    out: dict[str, Any] = {"num_evals": M}
    out["rank"] = int(np.count_nonzero(S > tolerance * s_max)) if rank is None else int(rank)
    out["rank_tolerance"] = tolerance
    out["sigma_max"] = s_max
    resolved = exact or lam[-1] > 100 * (sigma_floor**2) * lam_max
    s_min = float(S[-1]) if resolved else _NAN
    out["sigma_min"] = s_min
    out["condition_number"] = (s_max / s_min if s_min > 0 else math.inf) if resolved else _NAN
    nuclear = float(S.sum())
    p = S[S > 0] / nuclear if nuclear > 0 else np.zeros(0)
    out.update(
        frobenius_norm=math.sqrt(total), nuclear_norm=nuclear,
        norm=total, log_norm=_log10(total), spectral_norm=lam_max, log_spectral_norm=_log10(lam_max),
        stable_rank=total / lam_max if lam_max > 0 else 0.0,
        effective_rank=float(math.exp(-np.sum(p * np.log(p)))) if p.size else 0.0,
        top10_energy=float(lam[:10].sum() / total) if total > 0 else _NAN,
    )
    cum = np.cumsum(lam) / total if total > 0 else np.ones(M)
    for pct in (90, 99):
        k = int(np.searchsorted(cum, pct / 100 - 8 * np.finfo(np.float64).eps) + 1) if total > 0 else 0
        out[f"rank_{pct}"] = min(k, M)
        out[f"rank_{pct}_fraction"] = min(k, M) / M
    if fit:
        out.update(_power_law(lam, M, min_evals, out["log_spectral_norm"]))
    if mp_fit:
        out.update(_marchenko_pastur(lam, mp_shape or (m, n)))
    if error is not None:
        out.update(verdict_columns(S, (m, n), error))
    return out


def _power_law(lam: np.ndarray, M: int, min_evals: int, log_spectral_norm: float) -> dict[str, Any]:
    if M < min_evals:
        out = {"alpha": _NAN, "xmin": _NAN, "xmax": float(lam[0]), "ks_distance": _NAN, "alpha_sigma": _NAN,
               "num_pl_spikes": -1, "fit_status": f"skipped: {M} eigenvalues < min_evals={min_evals}"}
    else:
        pl = fit_power_law(lam, thresh=EVALS_THRESH)
        out = {"alpha": pl.alpha, "xmin": pl.xmin, "xmax": pl.xmax, "ks_distance": pl.D, "alpha_sigma": pl.sigma,
               "num_pl_spikes": pl.num_pl_spikes, "fit_status": pl.status if pl.ok else f"failed: {pl.reason}"}
    alpha = out["alpha"]
    ok = math.isfinite(alpha)
    out["alpha_weighted"] = alpha * log_spectral_norm if ok else _NAN
    with np.errstate(over="ignore", divide="ignore"):
        out["log_alpha_norm"] = _log10(float(np.sum(lam**alpha))) if ok else _NAN
    out["warning"] = "over-trained" if ok and alpha < _OVER_TRAINED else "under-trained" if ok and alpha > _UNDER_TRAINED else ""
    return out


def _marchenko_pastur(lam: np.ndarray, shape: tuple[int, int]) -> dict[str, Any]:
    N, M = max(shape), min(shape)
    try:
        mp = fit_marchenko_pastur(lam, N / M, M)
    except ValueError as exc:
        return {"sigma_mp": _NAN, "bulk_min": _NAN, "bulk_max": _NAN, "num_spikes": -1, "mp_softrank": _NAN,
                "w_scale": _NAN, "mp_status": f"failed: {exc}"}
    return mp.to_dict()
