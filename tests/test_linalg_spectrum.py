"""Spectrum metrics against direct NumPy computations (and sklearn's PCA), batched and degenerate input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from svdkit.linalg import (
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
    svdvals,
    tail_error,
)

SETTINGS = settings(max_examples=60, deadline=None)

# Descending non-negative spectra, zeros included (rank-deficient and all-zero cases).
spectra = arrays(
    np.float64,
    st.integers(1, 30),
    elements=st.one_of(st.just(0.0), st.floats(1e-6, 1e3)),
).map(lambda a: np.sort(a)[::-1].copy())


def _np_effective_rank(w: np.ndarray) -> float:
    total = w.sum()
    if total == 0:
        return 0.0
    p = w[w > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def _np_tail(s: np.ndarray, k: int) -> float:
    total = (s**2).sum()
    return 0.0 if total == 0 else float(np.sqrt((s[k:] ** 2).sum() / total))


# --------------------------------------------------------------------------- norms against np.linalg.norm


def test_norms_match_numpy_matrix_norms():
    A = np.random.default_rng(0).standard_normal((9, 6))
    S = svdvals(A)
    assert spectral_norm(S) == pytest.approx(np.linalg.norm(A, 2), rel=1e-12)
    assert nuclear_norm(S) == pytest.approx(np.linalg.norm(A, "nuc"), rel=1e-12)
    assert frobenius_norm(S) == pytest.approx(np.linalg.norm(A, "fro"), rel=1e-12)
    assert condition_number(S) == pytest.approx(np.linalg.cond(A), rel=1e-10)
    assert stable_rank(S) == pytest.approx(np.linalg.norm(A, "fro") ** 2 / np.linalg.norm(A, 2) ** 2, rel=1e-12)
    for fn in (spectral_norm, nuclear_norm, frobenius_norm, condition_number, stable_rank):
        assert type(fn(S)) is float


@SETTINGS
@given(s=spectra)
def test_metrics_match_direct_formulas(s):
    tiny = s.max() == 0
    assert spectral_norm(s) == pytest.approx(s.max())
    assert nuclear_norm(s) == pytest.approx(s.sum())
    assert frobenius_norm(s) == pytest.approx(np.sqrt((s**2).sum()))
    cond = condition_number(s)
    if s.min() == 0:
        assert cond == math.inf
    else:
        assert cond == pytest.approx(s.max() / s.min())
    power = s**2
    curve = energy(s)
    assert curve.shape == s.shape
    np.testing.assert_allclose(curve, np.ones_like(s) if tiny else np.cumsum(power) / power.sum(), rtol=1e-12)
    evr = explained_variance_ratio(s)
    np.testing.assert_allclose(evr, np.zeros_like(s) if tiny else power / power.sum(), rtol=1e-12)
    assert effective_rank(s) == pytest.approx(_np_effective_rank(s), rel=1e-9)
    assert effective_rank(s, kind="variance") == pytest.approx(_np_effective_rank(power), rel=1e-9)
    sr = 0.0 if tiny else power.sum() / power.max()
    assert stable_rank(s) == pytest.approx(sr, rel=1e-12)
    pr = 0.0 if tiny else power.sum() ** 2 / (power**2).sum()
    assert participation_ratio(s) == pytest.approx(pr, rel=1e-12)
    if not tiny:
        # stable rank <= participation ratio <= number of non-zero values; 1 <= effective rank <= that number
        nonzero = int((s > 0).sum())
        assert sr <= participation_ratio(s) * (1 + 1e-9) <= nonzero * (1 + 2e-9)
        assert 1 - 1e-9 <= effective_rank(s) <= nonzero * (1 + 1e-9)
    for k in range(len(s) + 2):
        assert tail_error(s, k) == pytest.approx(_np_tail(s, k), abs=1e-12)


@SETTINGS
@given(s=spectra, fraction=st.floats(0.01, 1.0))
def test_energy_rank_is_the_smallest_sufficient_rank(s, fraction):
    k = energy_rank(s, fraction)
    assert type(k) is int
    power = s**2
    if power.sum() == 0:
        assert k == 0
        return
    kept = np.concatenate([[0.0], np.cumsum(power)]) / power.sum()
    assert kept[k] >= fraction - 1e-12  # enough ...
    assert kept[k - 1] < fraction or abs(kept[k - 1] - fraction) <= 1e-12  # ... and one less is not (up to rounding)


def test_energy_rank_examples():
    s = np.array([3.0, 2.0, 1.0, 0.0, 0.0])  # energies 9, 4, 1 of 14
    assert energy_rank(s, 9 / 14) == 1
    assert energy_rank(s, 9 / 14 + 1e-9) == 2
    assert energy_rank(s, 0.99) == 3
    assert energy_rank(s, 1.0) == 3  # the zeros are never needed
    assert energy_rank(np.ones(7), 1.0) == 7  # rounding in the cumulative sum does not push it past r
    assert energy_rank(np.zeros(4), 0.5) == 0
    for bad in (0.0, -0.1, 1.01, 2):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            energy_rank(s, bad)


def test_tail_error_is_the_eckart_young_error():
    A = np.random.default_rng(1).standard_normal((12, 8))
    U, s, Vh = np.linalg.svd(A, full_matrices=False)
    for k in range(0, 9):
        Ak = (U[:, :k] * s[:k]) @ Vh[:k]
        direct = np.linalg.norm(A - Ak) / np.linalg.norm(A)
        assert tail_error(s, k) == pytest.approx(direct, rel=1e-10, abs=1e-14)
    assert tail_error(s, 0) == 1.0
    assert tail_error(s, 100) == 0.0
    assert tail_error(np.zeros(3), 1) == 0.0
    assert tail_error(s, np.int64(2)) == pytest.approx(tail_error(s, 2))
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="non-negative int"):
            tail_error(s, bad)


def test_numerical_rank_matches_numpy_matrix_rank():
    rng = np.random.default_rng(2)
    for rank in (0, 1, 3, 6):
        A = rng.standard_normal((10, rank)) @ rng.standard_normal((rank, 6)) if rank else np.zeros((10, 6))
        S = np.linalg.svd(A, compute_uv=False)
        assert numerical_rank(S, A.shape) == np.linalg.matrix_rank(A) == rank
    # The default tolerance is max(m, n) * eps * s_max: shape matters.
    S = np.array([1.0, 5e-15])
    assert numerical_rank(S, (2, 2)) == 2  # 2 * 2.2e-16 = 4.4e-16 < 5e-15
    assert numerical_rank(S, (2, 100)) == 1  # 100 * 2.2e-16 = 2.2e-14 > 5e-15
    assert numerical_rank(S) == 2  # without a shape, r = 2 is used
    # The epsilon of the spectrum's dtype, or an explicit one.
    S32 = np.array([1.0, 1e-6], dtype=np.float32)
    assert numerical_rank(S32, (4, 4)) == 2
    assert numerical_rank(S32, (20, 20)) == 1  # 20 * 1.19e-7 > 1e-6
    assert numerical_rank(np.array([1.0, 1e-6]), (20, 20), eps=float(np.finfo(np.float32).eps)) == 1
    # An absolute tolerance overrides the rule.
    assert numerical_rank(np.array([3.0, 2.0, 1.0]), tol=1.5) == 2
    assert numerical_rank(np.array([3.0, 2.0, 1.0]), tol=0.0) == 3
    with pytest.raises(ValueError, match="tol must be >= 0"):
        numerical_rank(np.array([1.0]), tol=-1.0)


def test_condition_number_infinite_when_singular():
    assert condition_number(np.array([2.0, 1.0, 0.0])) == math.inf
    assert condition_number(np.zeros(3)) == math.inf
    assert condition_number(np.array([4.0, 2.0])) == 2.0


def test_effective_rank_reference_values():
    assert effective_rank(np.ones(5)) == pytest.approx(5.0)
    assert effective_rank(np.array([1.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(np.zeros(4)) == 0.0
    # sigma vs variance: the variance form concentrates mass on the top values
    s = np.array([2.0, 1.0])
    assert effective_rank(s) == pytest.approx(math.exp(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))))
    assert effective_rank(s, kind="variance") == pytest.approx(math.exp(-(0.8 * math.log(0.8) + 0.2 * math.log(0.2))))
    with pytest.raises(ValueError, match="kind must be"):
        effective_rank(s, kind="entropy")


def test_explained_variance_ratio_matches_sklearn_pca():
    decomposition = pytest.importorskip("sklearn.decomposition")
    X = np.random.default_rng(3).standard_normal((40, 7)) * np.arange(1, 8)
    pca = decomposition.PCA(svd_solver="full").fit(X)
    ours = explained_variance_ratio(svdvals(X - X.mean(axis=0)))
    np.testing.assert_allclose(ours, pca.explained_variance_ratio_, rtol=1e-10)


def test_break_even_rank():
    assert break_even_rank((4096, 4096)) == 2048
    assert break_even_rank((4096, 11008)) == pytest.approx(4096 * 11008 / 15104)
    assert break_even_rank([3, 6]) == 2
    for bad in ((0, 5), (3,), (2, 3, 4), (-1, 2)):
        with pytest.raises(ValueError, match="shape must be"):
            break_even_rank(bad)


# --------------------------------------------------------------------------- batched input and types


BATCHED = [
    spectral_norm,
    nuclear_norm,
    frobenius_norm,
    condition_number,
    stable_rank,
    participation_ratio,
    effective_rank,
    lambda S: effective_rank(S, kind="variance"),
    lambda S: numerical_rank(S, (8, 5)),
    lambda S: energy_rank(S, 0.9),
    lambda S: tail_error(S, 2),
]


@pytest.mark.parametrize("fn", BATCHED)
def test_batched_equals_per_row(fn):
    rng = np.random.default_rng(4)
    S = np.sort(np.abs(rng.standard_normal((2, 3, 5))), axis=-1)[..., ::-1].copy()
    S[1, 2] = 0.0  # a zero matrix in the batch
    S[0, 1, 3:] = 0.0  # a rank-deficient one
    out = fn(S)
    assert isinstance(out, np.ndarray) and out.shape == (2, 3)
    expected = np.array([[fn(S[i, j]) for j in range(3)] for i in range(2)])
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    out_t = fn(torch.from_numpy(S))
    assert isinstance(out_t, torch.Tensor) and out_t.shape == (2, 3)
    np.testing.assert_allclose(out_t.numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("fn", [energy, explained_variance_ratio])
def test_batched_curves(fn):
    S = torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    out = fn(S)
    assert out.shape == (2, 3) and out.dtype == torch.float64
    torch.testing.assert_close(out[0], fn(S[0]))
    assert isinstance(fn(np.array([1.0, 0.5])), np.ndarray)


def test_integer_results_are_ints():
    S = torch.tensor([3.0, 2.0, 0.0])
    assert type(numerical_rank(S)) is int
    assert type(energy_rank(S, 0.5)) is int
    assert type(spectral_norm([3, 2])) is float


@pytest.mark.parametrize("fn", [spectral_norm, energy, effective_rank, lambda S: tail_error(S, 1), lambda S: numerical_rank(S)])
def test_invalid_spectra(fn):
    with pytest.raises(ValueError, match="negative"):
        fn(np.array([1.0, -0.5]))
    with pytest.raises(ValueError, match="non-finite"):
        fn(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="non-finite"):
        fn(np.array([np.inf, 1.0]))
    with pytest.raises(ValueError, match="at least one singular value"):
        fn(np.array([]))
    with pytest.raises(ValueError, match="at least one singular value"):
        fn(np.float64(1.0))


# --------------------------------------------------------------------------- compression_suitability


def test_compression_suitability_numbers_match_numpy():
    s = np.arange(1, 101, dtype=np.float64) ** -1.0
    shape = (100, 300)
    report = compression_suitability(s, shape)
    power = s**2
    kept = np.cumsum(power) / power.sum()
    rank_90 = int(np.argmax(kept >= 0.9)) + 1
    assert report.rank_90 == rank_90
    assert report.rank_90_fraction == pytest.approx(rank_90 / 100)
    assert report.params_kept_at_90 == pytest.approx(rank_90 * 400 / 30000)
    assert report.break_even_rank == pytest.approx(75.0)
    assert set(report.errors) == {0.01, 0.05, 0.10, 0.20}
    for frac, err in report.errors.items():
        k = max(1, round(frac * 100))
        assert err == pytest.approx(_np_tail(s, k))
    assert report.verdict == "compress"
    assert str(rank_90) in report.reason


@pytest.mark.parametrize(
    "s,verdict,word",
    [
        (np.arange(1, 101, dtype=np.float64) ** -2.0, "compress", "keeps"),
        (np.linspace(1.0, 0.01, 100) ** 2, "marginal", "still keeps"),
        (np.ones(100), "keep_dense", "break-even"),
        (np.zeros(100), "compress", "zero"),
    ],
)
def test_compression_suitability_verdicts(s, verdict, word, capsys):
    report = compression_suitability(s, (100, 100))
    assert isinstance(report, CompressionSuitability)
    assert report.verdict == verdict
    assert word in report.reason
    kept = report.params_kept_at_90
    if verdict == "compress" and report.rank_90:
        assert kept <= 0.5
    elif verdict == "marginal":
        assert 0.5 < kept < 1
    elif verdict == "keep_dense":
        assert kept >= 1
    data = report.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["shape"] == [100, 100] and set(data["errors"]) == {"0.01", "0.05", "0.1", "0.2"}
    assert capsys.readouterr() == ("", "")  # never prints


def test_compression_suitability_errors():
    with pytest.raises(ValueError, match=r"one spectrum of shape \(r,\)"):
        compression_suitability(np.ones((2, 5)), (5, 5))
    with pytest.raises(ValueError, match="shape must be"):
        compression_suitability(np.ones(5), (5,))


def test_numpy_views_are_accepted():
    s = np.sort(np.array([0.5, 2.0, 1.0]))[::-1]  # a reversed view: negative strides
    assert spectral_norm(s) == 2.0
    assert spectral_norm(np.array([3.0])[::-1]) == 3.0  # a 1-element reversed view
    assert energy_rank(np.array([[2.0, 0.0], [1.0, 1.0]]).T[0], 1.0) == 2  # a strided column: [2, 1]
