"""Power-law and Marchenko-Pastur fits of an empirical spectral density (ESD).

:func:`fit_power_law` reproduces WeightWatcher's default fit (``pl_package='ww'``, the
``WWFit`` class) exactly, in vectorised form:

1. keep the eigenvalues ``lambda > thresh`` (``EVALS_THRESH = 1e-5``), sorted ascending in float64;
2. every kept value but the largest is a candidate ``xmin``; for candidate ``i`` with tail size
   ``n = N - i`` the Hill estimate is ``alpha_i = 1 + n / (sum_{j>=i} ln lambda_j - n ln lambda_i)``;
3. its Kolmogorov-Smirnov distance is
   ``D_i = max_{t=0..n-1} |1 - (lambda_{i+t}/lambda_i)^(1-alpha_i) - t/n|`` when ``alpha_i > 1``,
   else 1;
4. the fit takes the first ``argmin_i D_i``.

Fewer than 20 kept values switch to WeightWatcher 0.7.7's small-sample rule: the bias-corrected
estimate ``1 + (n-1)/sum ln(x/xmin)`` on tails of at least 8 values, still chosen by ``argmin D``.

The suffix sums make every ``alpha_i`` O(1). The distances would form an O(N^2) triangle;
a branch and bound (a cheap lower bound of each ``D_i`` from a few points of its tail, then exact
distances in increasing order of the bound until the bound passes the best) finds the same
argmin, first index on ties, from a few dozen exact rows.

The Marchenko-Pastur fit lives in :mod:`svdkit.analysis.marchenko_pastur`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["EVALS_THRESH", "PowerLawFit", "fit_power_law"]

#: Eigenvalues at or below this are left out of the power-law fit (WeightWatcher's ``EVALS_THRESH``).
EVALS_THRESH = 1e-5
_SMALL_N = 20  # WeightWatcher's SMALL_N_CUTOFF
_SMALL_N_MIN_TAIL = 8
_CHUNK_ELEMENTS = 1 << 22  # entries of the KS triangle computed at once (32 MiB of float64)


@dataclass(frozen=True)
class PowerLawFit:
    """A power-law fit ``p(lambda) ~ lambda^(-alpha)`` for ``lambda >= xmin``.

    Attributes
    ----------
    alpha : float
        Exponent; NaN when the fit failed.
    xmin, xmax : float
        Smallest eigenvalue of the fitted tail; the largest eigenvalue.
    D : float
        Kolmogorov-Smirnov distance of the fit.
    sigma : float
        ``(alpha - 1) / sqrt(n_tail)``, the standard error of the Hill estimate.
    num_pl_spikes : int
        Eigenvalues ``>= xmin`` (the tail size), over all eigenvalues given.
    num_fitted : int
        Eigenvalues above the threshold that took part.
    status : {"success", "failed"}
    reason : str
        Why the fit failed ("" on success).
    """

    alpha: float
    xmin: float
    xmax: float
    D: float
    sigma: float
    num_pl_spikes: int
    num_fitted: int
    status: str = "success"
    reason: str = ""

    @property
    def ok(self) -> bool:
        """Whether the fit succeeded."""
        return self.status == "success"

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return asdict(self)


def _failed(n: int, xmax: float, reason: str) -> PowerLawFit:
    nan = float("nan")
    return PowerLawFit(nan, nan, xmax, nan, nan, -1, n, "failed", reason)


def _as_sorted_evals(evals: Any) -> np.ndarray:
    if hasattr(evals, "detach"):
        evals = evals.detach().cpu().double().numpy()
    x = np.asarray(evals, dtype=np.float64).ravel()
    if x.size and not np.isfinite(x).all():
        raise ValueError(f"the eigenvalues hold {int((~np.isfinite(x)).sum())} non-finite values of {x.size}")
    return np.sort(x)


def _ks_rows(logx: np.ndarray, alphas: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Exact ``D_i`` for the candidate indices ``rows`` (ascending), one vectorised block."""
    N = logx.size
    first = int(rows[0])
    i = rows[:, None]
    t = np.arange(first, N)[None, :] - i  # offset into each tail; negative left of the candidate
    n = (N - rows).astype(np.float64)[:, None]
    a = alphas[rows][:, None]
    with np.errstate(over="ignore", invalid="ignore"):
        gap = np.abs(1.0 - np.exp((1.0 - a) * (logx[None, first:] - logx[rows][:, None])) - t / n)
    gap[t < 0] = -np.inf
    return np.where(alphas[rows] > 1, gap.max(axis=1), 1.0)


def _ks_argmin(logx: np.ndarray, alphas: np.ndarray) -> tuple[int, float]:
    """``(argmin_i D_i, min D)`` over the candidates ``i = 0..N-2``, first index on ties.

    Exact, by branch and bound: a lower bound of every ``D_i`` from a few probe points of its
    tail orders the candidates, and exact distances are computed in that order until the next
    bound exceeds the best distance found. Usually a few dozen of the ``N - 1`` candidates need
    their full O(N) distance.
    """
    N = logx.size
    cands = np.arange(N - 1)
    probes = np.unique(np.concatenate([np.linspace(0, N - 1, 48).round(), np.geomspace(1, N, 24).round() - 1])).astype(int)
    t = probes[None, :] - cands[:, None]
    n = (N - cands).astype(np.float64)[:, None]
    a = alphas[:, None]
    with np.errstate(over="ignore", invalid="ignore"):
        gap = np.abs(1.0 - np.exp((1.0 - a) * (logx[probes][None, :] - logx[cands][:, None])) - t / n)
    gap[t < 0] = 0.0
    bound = np.where(alphas[cands] > 1, np.nan_to_num(gap.max(axis=1), nan=0.0), 1.0)
    order = np.argsort(bound, kind="stable")
    best_i, best_d = -1, np.inf
    block = max(8, _CHUNK_ELEMENTS // (64 * max(N, 1)))
    for start in range(0, order.size, block):
        chunk = order[start:start + block]
        if bound[chunk[0]] > best_d:
            break
        rows = np.sort(chunk)
        D = _ks_rows(logx, alphas, rows)
        for r, d in zip(rows, D):
            if d < best_d or (d == best_d and r < best_i):
                best_i, best_d = int(r), float(d)
    return best_i, best_d


def fit_power_law(evals: Any, *, thresh: float = EVALS_THRESH) -> PowerLawFit:
    """Fit a power law to the tail of an ESD the way WeightWatcher does (see the module docstring).

    Parameters
    ----------
    evals : array-like or Tensor of shape (M,)
        Eigenvalues ``lambda = s**2`` of one layer (any order; pooled Conv2d slices included).
    thresh : float
        Only ``lambda > thresh`` take part.

    Returns
    -------
    PowerLawFit
        ``status == "failed"`` (alpha NaN, num_pl_spikes -1) when fewer than two eigenvalues pass
        the threshold or no candidate gives ``alpha > 1``.

    Raises
    ------
    ValueError
        If ``evals`` holds NaN or Inf.
    """
    x_all = _as_sorted_evals(evals)
    xmax_all = float(x_all[-1]) if x_all.size else float("nan")
    x = x_all[x_all > thresh]
    N = x.size
    if N < 2:
        return _failed(N, xmax_all, f"{N} eigenvalue(s) above {thresh:g}; a fit needs at least 2")
    logx = np.log(x)
    # tail_sum[i] = sum_{j >= i} ln x_j
    tail_sum = np.cumsum(logx[::-1])[::-1]
    i = np.arange(N - 1)
    n = (N - i).astype(np.float64)
    spread = tail_sum[:-1] - n * logx[:-1]
    if N < _SMALL_N:
        return _fit_small_n(x, logx, spread, n, x_all)
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = 1.0 + n / spread
    # A degenerate tail (all values equal) has no finite exponent: it is not a power law.
    alphas = np.where(np.isfinite(alphas), alphas, 1.0)
    best, D_best = _ks_argmin(logx, alphas)
    if not alphas[best] > 1:
        return _failed(N, xmax_all, "no candidate xmin gives alpha > 1")
    return _finish(alphas[best], x[best], D_best, n[best], x_all, N)


def _fit_small_n(x, logx, spread, n, x_all) -> PowerLawFit:
    """WeightWatcher 0.7.7's small-sample fit, as it behaves.

    ``fit_powerlaw_smallN`` computes bias-corrected exponents and distances for tails of at least
    8 values (others keep ``alpha = 0, D = 1``) and picks by ``D - 0.868/sqrt(n)``; the caller
    (``WWFit.__init__``) then re-picks by ``argmin D`` over the same arrays, which is what
    WeightWatcher reports and what this reproduces.
    """
    N = x.size
    alphas = np.zeros(N - 1)
    D = np.ones(N - 1)
    usable = (n >= _SMALL_N_MIN_TAIL) & (spread > 1e-12)
    alphas[usable] = 1.0 + (n[usable] - 1.0) / spread[usable]
    candidates = np.flatnonzero(usable & (alphas > 1))
    if candidates.size == 0 and spread[0] > 1e-12:
        candidates = np.array([0])  # WeightWatcher's fallback: the whole sample as the tail
        alphas[0] = 1.0 + (n[0] - 1.0) / spread[0]
    for i in candidates:
        if alphas[i] <= 1:
            continue
        t = np.arange(int(n[i]))
        fitted = 1.0 - np.exp((1.0 - alphas[i]) * (logx[i:] - logx[i]))
        D[i] = float(np.max(np.abs(t / n[i] - fitted)))
    best = int(np.argmin(D))
    if not alphas[best] > 1:
        return _failed(N, float(x_all[-1]), "no candidate xmin gives alpha > 1")
    return _finish(alphas[best], x[best], D[best], n[best], x_all, N)


def _finish(alpha, xmin, D, n_tail, x_all, N) -> PowerLawFit:
    alpha = float(alpha)
    return PowerLawFit(
        alpha=alpha,
        xmin=float(xmin),
        xmax=float(x_all[-1]),
        D=float(D),
        sigma=(alpha - 1.0) / math.sqrt(n_tail),
        num_pl_spikes=int(np.count_nonzero(x_all >= xmin)),
        num_fitted=int(N),
    )
