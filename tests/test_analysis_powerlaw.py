"""The power-law and Marchenko-Pastur fits against direct computations."""

import math

import numpy as np
import pytest

from svdkit.analysis.powerlaw import EVALS_THRESH, fit_marchenko_pastur, fit_power_law, marchenko_pastur_median


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


def test_marchenko_pastur_median_against_sampling():
    rng = np.random.default_rng(2)
    N, M = 1600, 400
    W = rng.standard_normal((N, M)) / math.sqrt(N)
    evals = np.linalg.eigvalsh(W.T @ W)
    assert marchenko_pastur_median(N / M) == pytest.approx(np.median(evals), rel=0.02)
    with pytest.raises(ValueError):
        marchenko_pastur_median(0.5)


def test_marchenko_pastur_fit_finds_planted_spikes():
    rng = np.random.default_rng(3)
    N, M = 1200, 300
    W = rng.standard_normal((N, M))
    random_fit = fit_marchenko_pastur(np.linalg.eigvalsh(W.T @ W), N / M)
    assert random_fit.num_spikes == 0
    assert random_fit.mp_softrank == pytest.approx(1.0, abs=0.1)
    u, v = rng.standard_normal(N), rng.standard_normal(M)
    spiked = W + 5 * np.outer(u / np.linalg.norm(u), v / np.linalg.norm(v)) * math.sqrt(N)
    spiked_fit = fit_marchenko_pastur(np.linalg.eigvalsh(spiked.T @ spiked), N / M)
    assert spiked_fit.num_spikes == 1
    assert spiked_fit.mp_softrank < 0.5
