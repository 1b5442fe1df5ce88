"""truncated_svd(): factors and statistics against NumPy, for exact and randomized routes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from linalg_helpers import decaying
from svdkit.linalg import Energy, ErrorTol, ParamRatio, RankRatio, TruncationStats, randomized_svd, svd, truncated_svd


def numpy_stats(A: np.ndarray, k: int) -> tuple[float, float]:
    U, s, Vh = np.linalg.svd(A, full_matrices=False)
    Ak = (U[:, :k] * s[:k]) @ Vh[:k]
    total = np.linalg.norm(A) ** 2
    return float(np.linalg.norm(A - Ak) / np.sqrt(total)), float((s[:k] ** 2).sum() / total)


@pytest.mark.parametrize("shape,k", [((30, 20), 5), ((20, 30), 1), ((25, 25), 25), ((1, 9), 1)])
def test_exact_factors_and_stats_match_numpy(shape, k):
    A = decaying(*shape, seed=1)
    (U, S, Vh), stats = truncated_svd(A, k)
    assert isinstance(stats, TruncationStats)
    m, n = shape
    assert U.shape == (m, k) and S.shape == (k,) and Vh.shape == (k, n)
    full = svd(A)
    np.testing.assert_array_equal(U, full.U[:, :k])
    np.testing.assert_array_equal(S, full.S[:k])
    err, energy = numpy_stats(A, k)
    assert stats.rank == k
    assert stats.compression_ratio == pytest.approx(m * n / (k * (m + n)))
    assert stats.relative_error == pytest.approx(err, abs=1e-12)
    assert stats.retained_energy == pytest.approx(energy, abs=1e-12)
    direct = np.linalg.norm(A - (U * S) @ Vh) / np.linalg.norm(A)
    assert stats.relative_error == pytest.approx(direct, abs=1e-12)
    assert isinstance(stats.relative_error, float) and isinstance(stats.retained_energy, float)


@pytest.mark.parametrize("spec", [Energy(0.9), ErrorTol(0.2), RankRatio(0.3), ParamRatio(0.5)])
def test_rank_specs(spec):
    A = decaying(40, 30, seed=2)
    (U, S, Vh), stats = truncated_svd(A, spec)
    assert U.shape[1] == stats.rank == S.shape[0]
    if isinstance(spec, Energy):
        assert stats.retained_energy >= 0.9 - 1e-12
        assert numpy_stats(A, stats.rank - 1)[1] < 0.9
    if isinstance(spec, ErrorTol):
        assert stats.relative_error <= 0.2 + 1e-12
        assert numpy_stats(A, stats.rank - 1)[0] > 0.2
    if isinstance(spec, RankRatio):
        assert stats.rank == 9
    if isinstance(spec, ParamRatio):
        assert stats.rank == int(0.5 * 40 * 30 / 70)
        assert stats.compression_ratio >= 2.0


def test_randomized_route_stats_match_its_factors():
    A = torch.from_numpy(decaying(200, 150, seed=3, alpha=0.7)).float()
    (U, S, Vh), stats = truncated_svd(A, 10, svd_method="randomized", seed=4)
    ref = randomized_svd(A, 10, seed=4)
    assert torch.equal(S, ref.S) and torch.equal(U, ref.U)
    direct = float(torch.linalg.matrix_norm((A - (U * S) @ Vh).double()) / torch.linalg.matrix_norm(A.double()))
    assert stats.relative_error == pytest.approx(direct, rel=1e-4)
    exact_err, exact_energy = numpy_stats(A.double().numpy(), 10)
    assert exact_err <= stats.relative_error <= exact_err * 1.01
    assert stats.retained_energy == pytest.approx(1 - stats.relative_error**2, abs=1e-6)


def test_auto_picks_randomized_only_for_small_int_ranks():
    A = torch.from_numpy(decaying(200, 150, seed=5)).float()
    (_, S_auto, _), _ = truncated_svd(A, 10, svd_method="auto", seed=0)  # 10 < 0.1 * 150
    assert torch.equal(S_auto, randomized_svd(A, 10, seed=0).S)
    (_, S_big, _), _ = truncated_svd(A, 20, svd_method="auto")  # 20 >= 15: exact
    assert torch.equal(S_big, svd(A).S[:20])
    (_, S_spec, _), stats = truncated_svd(A, Energy(0.5), svd_method="auto")  # a spec needs the full spectrum
    assert torch.equal(S_spec, svd(A).S[: stats.rank])


def test_batched_stats_are_tensors():
    A = torch.from_numpy(np.stack([decaying(30, 20, seed=s) * (s + 1) for s in range(4)])).reshape(2, 2, 30, 20)
    (U, S, Vh), stats = truncated_svd(A, 4)
    assert U.shape == (2, 2, 30, 4) and S.shape == (2, 2, 4)
    assert isinstance(stats.relative_error, torch.Tensor) and stats.relative_error.shape == (2, 2)
    for idx in np.ndindex(2, 2):
        err, energy = numpy_stats(A[idx].numpy(), 4)
        assert float(stats.relative_error[idx]) == pytest.approx(err, abs=1e-12)
        assert float(stats.retained_energy[idx]) == pytest.approx(energy, abs=1e-12)
    (_, _, _), rstats = truncated_svd(A.float(), 4, svd_method="randomized")
    assert rstats.relative_error.shape == (2, 2)


def test_zero_matrix():
    (U, S, Vh), stats = truncated_svd(np.zeros((5, 4)), 2)
    assert stats.relative_error == 0.0 and stats.retained_energy == 1.0
    np.testing.assert_array_equal(S, [0.0, 0.0])


def test_half_precision_and_numpy_types():
    A = torch.from_numpy(decaying(16, 12, seed=6)).to(torch.bfloat16)
    (U, S, Vh), stats = truncated_svd(A, 3)
    assert U.dtype == S.dtype == Vh.dtype == torch.bfloat16
    (Un, Sn, Vhn), _ = truncated_svd(decaying(16, 12, seed=6).astype(np.float32), 3)
    assert isinstance(Un, np.ndarray) and Un.dtype == np.float32


def test_rank_above_min_is_capped():
    (U, S, Vh), stats = truncated_svd(decaying(8, 5), 50)
    assert stats.rank == 5 and stats.relative_error == pytest.approx(0.0, abs=1e-12)


def test_errors():
    A = decaying(10, 8)
    with pytest.raises(ValueError, match=r"rank spec Energy\(value=0.9\) needs a single matrix, got shape \(2, 10, 8\)"):
        truncated_svd(np.stack([A, A]), Energy(0.9))
    with pytest.raises(ValueError, match="method must be 'exact', 'randomized' or 'auto', got 'fast'"):
        truncated_svd(A, 2, svd_method="fast")
    with pytest.raises(ValueError, match=r"rank 0 for a 10x8 matrix"):
        truncated_svd(A, 0)
    with pytest.raises(ValueError, match="unknown rank spec"):
        truncated_svd(A, 0.5)
    A[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"1 NaN and 0 Inf"):
        truncated_svd(A, 2)
