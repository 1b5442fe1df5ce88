"""The power-law and Marchenko-Pastur fits against direct computations."""

import math

import numpy as np
import pytest

from svdkit.analysis.marchenko_pastur import fit_marchenko_pastur, linear_kde
from svdkit.analysis.powerlaw import EVALS_THRESH, fit_power_law

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_fit(evals, thresh=EVALS_THRESH):
    """WeightWatcher's WWFit.fit_power_law_standard, written as a plain loop."""
    x = np.sort(np.asarray(evals, dtype=np.float64))
    x = x[x > thresh]
    N = x.size
    logx = np.log(x)
    alphas, Ds = np.zeros(N - 1), np.ones(N - 1)
    for i in range(N - 1):
        n = float(N - i)
        alphas[i] = 1 + n / (np.sum(logx[i:]) - n * logx[i])
        if alphas[i] > 1:
            Ds[i] = np.max(np.abs(1 - (x[i:] / x[i]) ** (1 - alphas[i]) - np.arange(n) / n))
    i = int(np.argmin(Ds))
    return alphas[i], x[i], Ds[i], (alphas[i] - 1) / math.sqrt(N - i)


@pytest.mark.parametrize("seed", range(8))
def test_fit_matches_the_loop_reference(seed):
    rng = np.random.default_rng(seed)
    N = int(rng.integers(25, 400))
    if seed % 2:
        W = rng.standard_normal((int(N * rng.uniform(1, 3)), N))
        evals = np.linalg.eigvalsh(W.T @ W)
    else:
        evals = (rng.pareto(rng.uniform(0.5, 4), N) + 1) * rng.uniform(1e-3, 10)
    fit = fit_power_law(evals)
    alpha, xmin, D, sigma = reference_fit(evals)
    assert fit.ok
    assert fit.alpha == pytest.approx(alpha, rel=1e-10)
    assert fit.xmin == xmin
    assert fit.D == pytest.approx(D, rel=1e-9, abs=1e-12)
    assert fit.sigma == pytest.approx(sigma, rel=1e-10)
    assert fit.num_pl_spikes == int(np.sum(evals >= xmin))
    assert fit.xmax == pytest.approx(evals.max())


def test_threshold_drops_tiny_eigenvalues():
    rng = np.random.default_rng(0)
    evals = np.concatenate([rng.pareto(2.0, 200) + 1, np.full(50, 1e-7), np.zeros(10)])
    fit = fit_power_law(evals)
    assert fit.num_fitted == 200
    assert fit.alpha == pytest.approx(reference_fit(evals)[0], rel=1e-10)


def test_recovers_a_known_exponent_from_samples():
    rng = np.random.default_rng(1)
    # p(x) ~ x^-3 for x >= 1: Pareto with shape alpha - 1 = 2.
    samples = rng.pareto(2.0, 5000) + 1
    assert fit_power_law(samples).alpha == pytest.approx(3.0, abs=0.1)


def test_too_few_values_fail_clearly():
    fit = fit_power_law([1e-9, 2.0])
    assert not fit.ok and math.isnan(fit.alpha) and fit.num_pl_spikes == -1
    assert "at least 2" in fit.reason
    with pytest.raises(ValueError, match="non-finite"):
        fit_power_law([1.0, float("nan"), 2.0])


def test_degenerate_tail_is_not_a_power_law():
    fit = fit_power_law(np.ones(50))
    assert not fit.ok


def test_linear_kde_is_scikit_learns():
    sklearn_neighbors = pytest.importorskip("sklearn.neighbors")
    rng = np.random.default_rng(2)
    x = rng.gamma(2.0, 1.0, 700)
    grid = np.linspace(0, x.max() + 0.5, 1000)
    kde = sklearn_neighbors.KernelDensity(kernel="linear", bandwidth=0.1).fit(x.reshape(-1, 1))
    np.testing.assert_allclose(linear_kde(x, grid), np.exp(kde.score_samples(grid[:, None])), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("N, M, spikes", [(1200, 300, 0), (1200, 300, 3), (256, 256, 0), (700, 90, 12)])
def test_marchenko_pastur_fit_is_weightwatchers(N, M, spikes):
    """Against WeightWatcher's own functions on the same rescaled eigenvalues (Q = 1: its quarter circle)."""
    pytest.importorskip("scipy")
    rmt = pytest.importorskip("weightwatcher.RMT_Util")
    rng = np.random.default_rng(3 + spikes)
    W = rng.standard_normal((N, M))
    if spikes:
        W += 4 * rng.standard_normal((N, spikes)) @ rng.standard_normal((spikes, M)) / math.sqrt(M)
    evals = np.linalg.eigvalsh(W.T @ W)
    fit = fit_marchenko_pastur(evals, N / M, M)
    w_scale = math.sqrt(evals.size / evals.sum())
    with np.errstate(all="ignore"):
        sigma, _ = rmt.fit_density_with_range(evals * w_scale**2, N / M, bw=0.1)
    assert fit.sigma_mp == pytest.approx(sigma, rel=1e-9) and fit.w_scale == pytest.approx(w_scale)
    bulk_max = (sigma * (1 + 1 / math.sqrt(N / M))) ** 2
    assert fit.bulk_max == pytest.approx(bulk_max / w_scale**2, rel=1e-9)
    assert fit.mp_softrank == pytest.approx(bulk_max / (evals.max() * w_scale**2), rel=1e-9)
    assert fit.num_spikes == spikes or (spikes and abs(fit.num_spikes - spikes) <= 1)


def test_marchenko_pastur_fit_bad_input():
    with pytest.raises(ValueError, match="Q = N/M must be >= 1"):
        fit_marchenko_pastur(np.ones(10), 0.5)
    with pytest.raises(ValueError, match="positive"):
        fit_marchenko_pastur(np.zeros(10), 2.0)
