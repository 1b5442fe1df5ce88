"""randomized_svd(): accuracy against the exact optimum, determinism, the exact path, every argument error."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from linalg_helpers import optimal_error, power_law, spectrum_tensor
from svdkit.linalg import randomized as randomized_module
from svdkit.linalg import layer_seed, randomized_svd, svd
from svdkit.linalg.randomized import AUTO_MAX_N_ITER, AUTO_TOL


pytestmark = pytest.mark.usefixtures("one_thread")


def frobenius_error(A: torch.Tensor, U, S, Vh) -> float:
    return float(torch.linalg.matrix_norm((A - (U * S.unsqueeze(-2)) @ Vh).double()))


def assert_orthonormal_columns(U: torch.Tensor, atol: float) -> None:
    k = U.shape[-1]
    eye = torch.eye(k, dtype=U.dtype).expand(*U.shape[:-2], k, k)
    torch.testing.assert_close(U.mT @ U, eye, atol=atol, rtol=0)


def assert_sign_convention(U: torch.Tensor) -> None:
    assert bool((U.amax(dim=-2) >= U.abs().amax(dim=-2)).all())


METHODS = [
    ("krylov", "auto", "auto"),
    ("krylov", "cholqr", "auto"),
    ("krylov", "qr", "auto"),
    ("subspace", "auto", "auto"),  # LU between steps, scikit-learn's n_iter rule (7 here)
    ("subspace", "lu", "auto"),
    ("subspace", "qr", "auto"),
    ("subspace", "none", 2),  # unnormalised power steps are only stable for small n_iter
]


@pytest.mark.parametrize("method,normalizer,n_iter", METHODS)
@pytest.mark.parametrize("shape", [(300, 200), (200, 300)], ids=["tall", "wide"])
def test_accuracy_on_decaying_spectrum(method, normalizer, n_iter, shape):
    m, n = shape
    s = power_law(min(m, n), 1.0)
    A = spectrum_tensor(s, m, n, seed=1)
    k = 10
    U, S, Vh = randomized_svd(A, k, method=method, normalizer=normalizer, n_iter=n_iter, seed=0)
    assert U.shape == (m, k) and S.shape == (k,) and Vh.shape == (k, n)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    ratio = frobenius_error(A, U, S, Vh) / optimal_error(s, k)
    assert 1 - 1e-4 <= ratio <= 1.01, ratio
    np.testing.assert_allclose(S.double().numpy(), s[:k], rtol=0.03)
    assert bool((S[:-1] >= S[1:]).all())
    assert_orthonormal_columns(U, 1e-5)
    assert_orthonormal_columns(Vh.mT, 1e-5)
    assert_sign_convention(U)


def test_krylov_default_is_near_optimal_on_slow_decay():
    """Trained weights decay like i^-0.7; the default (block Krylov, adaptive) stays within 0.5 %."""
    m, n, k = 400, 600, 20
    s = power_law(m, 0.7)
    A = spectrum_tensor(s, m, n, seed=2)
    U, S, Vh = randomized_svd(A, k, seed=0)
    ratio = frobenius_error(A, U, S, Vh) / optimal_error(s, k)
    assert ratio <= 1.005, ratio
    np.testing.assert_allclose(S.double().numpy(), s[:k], rtol=0.02)
    # One pass pair (n_iter=0) is measurably worse: the power steps do the work.
    U0, S0, Vh0 = randomized_svd(A, k, seed=0, n_iter=0)
    assert frobenius_error(A, U0, S0, Vh0) / optimal_error(s, k) > ratio + 0.005


def test_singular_vectors_match_exact_where_separated():
    m, n, k = 250, 180, 8
    s = np.geomspace(1.0, 1e-6, min(m, n))  # fast decay: gaps between the top values are wide
    A = spectrum_tensor(s, m, n, seed=3)
    U, S, Vh = randomized_svd(A, k, seed=0)
    Ue, Se, Vhe = svd(A)
    torch.testing.assert_close(S, Se[:k], atol=1e-5, rtol=1e-4)
    # The leading vectors converge fastest; the last ones feel the (unresolved) gap to s_{k+1}.
    torch.testing.assert_close(U[:, :6], Ue[:, :6], atol=1e-4, rtol=0)
    torch.testing.assert_close(Vh[:6], Vhe[:6], atol=1e-4, rtol=0)


def test_float64_low_rank_is_exact():
    rng = np.random.default_rng(4)
    A = rng.standard_normal((120, 6)) @ rng.standard_normal((6, 90))
    U, S, Vh = randomized_svd(A, 6, seed=0)
    assert isinstance(U, np.ndarray) and U.dtype == np.float64
    np.testing.assert_allclose((U * S) @ Vh, A, atol=1e-11)
    np.testing.assert_allclose(S, np.linalg.svd(A, compute_uv=False)[:6], rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_in_same_dtype_out(dtype):
    s = power_law(80, 1.0)
    A = spectrum_tensor(s, 120, 80, seed=5).to(dtype)
    U, S, Vh = randomized_svd(A, 5, seed=0)
    assert U.dtype == S.dtype == Vh.dtype == dtype
    ref = randomized_svd(A.float(), 5, seed=0)
    torch.testing.assert_close(S, ref.S.to(dtype))


def test_batched_and_per_matrix_accuracy():
    s = power_law(60, 1.0)
    mats = torch.stack([spectrum_tensor(s * (i + 1), 90, 60, seed=10 + i) for i in range(6)]).reshape(2, 3, 90, 60)
    k = 6
    U, S, Vh = randomized_svd(mats, k, seed=0)
    assert U.shape == (2, 3, 90, k) and S.shape == (2, 3, k) and Vh.shape == (2, 3, k, 60)
    assert_orthonormal_columns(U, 1e-5)
    assert_sign_convention(U)
    for idx in np.ndindex(2, 3):
        scale = 3 * idx[0] + idx[1] + 1
        ratio = frobenius_error(mats[idx], U[idx], S[idx], Vh[idx]) / (scale * optimal_error(s, k))
        assert ratio <= 1.01, (idx, ratio)


def test_wide_and_tall_share_the_short_side():
    """The basis lives on the short side: A and A^T give the same spectrum for one seed."""
    A = spectrum_tensor(power_law(70, 0.8), 70, 200, seed=6)
    wide = randomized_svd(A, 12, seed=3)
    tall = randomized_svd(A.T.contiguous(), 12, seed=3)
    torch.testing.assert_close(wide.S, tall.S, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close((wide.U * wide.S) @ wide.Vh, ((tall.U * tall.S) @ tall.Vh).T, atol=1e-5, rtol=0)


def test_seed_determinism():
    A = spectrum_tensor(power_law(150, 0.7), 200, 150, seed=7)
    first = randomized_svd(A, 10, seed=123)
    again = randomized_svd(A, 10, seed=123)
    for x, y in zip(first, again):
        assert torch.equal(x, y)
    other = randomized_svd(A, 10, seed=124)
    assert not torch.equal(first.S, other.S)
    # Different sketches, both near the optimum: they differ, but only slightly.
    torch.testing.assert_close(first.S, other.S, rtol=2e-2, atol=0)
    gen = randomized_svd(A, 10, seed=torch.Generator().manual_seed(123))
    assert torch.equal(gen.S, first.S)
    torch.manual_seed(0)
    g1 = randomized_svd(A, 10)
    torch.manual_seed(0)
    g2 = randomized_svd(A, 10)
    assert torch.equal(g1.U, g2.U)


def test_numpy_in_numpy_out_and_input_untouched():
    A = np.asarray(spectrum_tensor(power_law(40, 1.0), 50, 40, seed=8), dtype=np.float32)
    before = A.copy()
    U, S, Vh = randomized_svd(A, 4, seed=0)
    assert all(isinstance(x, np.ndarray) and x.dtype == np.float32 for x in (U, S, Vh))
    np.testing.assert_array_equal(A, before)


@pytest.mark.parametrize(
    "method,k,oversamples",
    [
        ("krylov", 10, 10),  # l = 20, 2 l > 30: no room for a second Krylov block
        ("subspace", 25, 10),  # l = 35 >= 30
        ("krylov", 30, 0),  # k = min(m, n)
    ],
)
def test_exact_path_when_sketch_is_as_large_as_matrix(method, k, oversamples):
    A = torch.randn(45, 30, dtype=torch.float64)
    got = randomized_svd(A, k, oversamples=oversamples, method=method, seed=0)
    U, S, Vh = svd(A)
    assert torch.equal(got.S, S[:k])
    assert torch.equal(got.U, U[:, :k])
    assert torch.equal(got.Vh, Vh[:k])


def test_krylov_depth_is_capped_not_abandoned():
    """l = 20 and r = 50: two Krylov blocks fit but not three; the result is still randomized."""
    A = torch.from_numpy(np.random.default_rng(9).standard_normal((80, 50)))
    got = randomized_svd(A, 10, seed=0)
    exact = svd(A)
    assert not torch.equal(got.S, exact.S[:10])
    assert frobenius_error(A, *got) / float(exact.S[10:].norm()) < 1.05


@pytest.mark.parametrize("method,normalizer", [("krylov", "auto"), ("krylov", "qr"), ("subspace", "auto")])
@pytest.mark.parametrize(
    "A",
    [
        torch.diag(torch.tensor([3.0, 2.0, 1.0] + [0.0] * 47)),  # exact zero blocks inside the iteration
        torch.ones(60, 40),
        torch.from_numpy(np.random.default_rng(10).standard_normal((70, 3)) @ np.random.default_rng(11).standard_normal((3, 55))).float(),
    ],
    ids=["diagonal", "ones", "rank3"],
)
@pytest.mark.parametrize("k", [2, 5, 12])
def test_rank_deficient_with_k_above_rank(A, k, method, normalizer):
    U, S, Vh = randomized_svd(A, k, method=method, normalizer=normalizer, seed=0)
    exact = torch.linalg.svdvals(A.double())
    scale = float(exact[0])
    torch.testing.assert_close(S.double(), exact[:k], atol=3e-6 * scale, rtol=0)
    assert_orthonormal_columns(U, 1e-5)
    assert_orthonormal_columns(Vh.mT, 1e-5)
    err = frobenius_error(A, U, S, Vh)
    assert err <= float(exact[k:].norm()) + 1e-5 * scale


@pytest.mark.parametrize("method", ["krylov", "subspace"])
def test_zero_matrix(method):
    U, S, Vh = randomized_svd(torch.zeros(40, 30), 4, method=method, seed=0)
    assert torch.equal(S, torch.zeros(4))
    assert_orthonormal_columns(U, 1e-6)
    assert_orthonormal_columns(Vh.mT, 1e-6)


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 40),
    n=st.integers(1, 40),
    k_frac=st.floats(0.0, 1.0),
    oversamples=st.integers(0, 12),
    n_iter=st.sampled_from(["auto", 0, 1, 3]),
    method=st.sampled_from(["krylov", "subspace"]),
    seed=st.integers(0, 1000),
)
def test_any_shape_gives_valid_factors(m, n, k_frac, oversamples, n_iter, method, seed):
    r = min(m, n)
    k = max(1, round(k_frac * r))
    A = torch.from_numpy(np.random.default_rng(seed).standard_normal((m, n)))
    U, S, Vh = randomized_svd(A, k, oversamples=oversamples, n_iter=n_iter, method=method, seed=seed)
    assert U.shape == (m, k) and S.shape == (k,) and Vh.shape == (k, n)
    assert_orthonormal_columns(U, 1e-10)
    assert_orthonormal_columns(Vh.mT, 1e-10)
    exact = torch.linalg.svdvals(A)
    # Ritz values never exceed the true ones (interlacing) and the error never beats Eckart-Young.
    assert bool((S <= exact[:k] * (1 + 1e-10) + 1e-12).all())
    assert frobenius_error(A, U, S, Vh) >= float(exact[k:].norm()) * (1 - 1e-9) - 1e-12


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k=0), r"k must be an int in \[1, min\(m, n\)\] = \[1, 20\] for shape \(30, 20\), got 0"),
        (dict(k=21), r"\[1, 20\].*got 21"),
        (dict(k=2.0), "got 2.0"),
        (dict(k=True), "got True"),
        (dict(k=3, oversamples=-1), "oversamples must be a non-negative int, got -1"),
        (dict(k=3, oversamples=1.5), "oversamples.*1.5"),
        (dict(k=3, n_iter=-1), "n_iter must be 'auto' or a non-negative int, got -1"),
        (dict(k=3, n_iter="many"), "n_iter.*'many'"),
        (dict(k=3, n_iter=1.0), "n_iter.*1.0"),
        (dict(k=3, method="lanczos"), "method must be 'krylov' or 'subspace', got 'lanczos'"),
        (dict(k=3, method="krylov", normalizer="lu"), "normalizer 'lu' does not apply to method 'krylov'"),
        (dict(k=3, method="subspace", normalizer="cholqr"), "normalizer 'cholqr' does not apply to method 'subspace'"),
        (dict(k=3, normalizer="householder"), "normalizer 'householder'"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        randomized_svd(torch.ones(30, 20), **kwargs)


def test_numpy_integer_arguments_are_accepted():
    A = torch.randn(30, 20)
    a = randomized_svd(A, np.int64(4), oversamples=np.int32(5), seed=0)
    b = randomized_svd(A, 4, oversamples=5, seed=0)
    assert torch.equal(a.S, b.S)


@pytest.mark.parametrize("method", ["krylov", "subspace"])
@pytest.mark.parametrize("shape", [(60, 40), (40, 60), (2, 50, 45)])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_is_reported(shape, value, method):
    """The NaN/Inf check runs on the first sketch; it must still name the counts and the shape."""
    A = torch.randn(shape)
    A[..., 7, 3] = value
    nan, inf = (A.isnan().sum(), A.isinf().sum())
    with pytest.raises(ValueError, match=rf"{re.escape(str(tuple(shape)))}.*{nan} NaN and {inf} Inf"):
        randomized_svd(A, 3, method=method, seed=0)


def test_overflowing_sketch_of_finite_input_says_so():
    A = torch.full((60, 40), 3e38)
    with pytest.raises(ValueError, match=r"\(60, 40\) is finite but its sketch A @ Omega overflows torch.float32"):
        randomized_svd(A, 2, seed=0)
    randomized_svd(A.double(), 2, seed=0)  # float64 has the range


def test_input_errors_are_shared_with_svd():
    A = torch.ones(5, 4)
    A[1, 1] = float("inf")
    with pytest.raises(ValueError, match=r"\(5, 4\).*0 NaN and 1 Inf"):
        randomized_svd(A, 2)
    with pytest.raises(ValueError, match="empty"):
        randomized_svd(torch.ones(0, 4), 1)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        randomized_svd(torch.ones(4), 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stays_on_cuda_with_the_cpu_sketch():
    A = spectrum_tensor(power_law(200, 0.7), 300, 200, seed=12)
    cpu = randomized_svd(A, 16, seed=5)
    gpu = randomized_svd(A.cuda(), 16, seed=5)
    assert all(x.is_cuda for x in gpu)
    torch.testing.assert_close(gpu.S.cpu(), cpu.S, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gpu.U.cpu()[:, :8], cpu.U[:, :8], atol=1e-2, rtol=0)
    sub = randomized_svd(A.cuda(), 16, seed=5, method="subspace")
    assert sub.U.is_cuda


# --------------------------------------------------------------------------- n_iter="auto": adaptive Krylov steps


def test_auto_takes_fewer_steps_on_low_rank_and_more_on_flat_spectra():
    """Easy spectra stop early, hard ones go on; all land within the tolerance of the optimum."""
    rng = np.random.default_rng(20)
    low_rank = torch.from_numpy(rng.standard_normal((300, 5)) @ rng.standard_normal((5, 200))).float()
    decaying = spectrum_tensor(power_law(200, 0.7), 300, 200, seed=21)
    flat = torch.from_numpy(rng.standard_normal((300, 200))).float()
    steps = {}
    for name, A in [("low_rank", low_rank), ("decaying", decaying), ("flat", flat)]:
        (U, S, Vh), info = randomized_svd(A, 8, seed=0, return_info=True)
        assert info.method == "krylov" and info.converged is True
        assert info.passes == 2 * (info.n_iter + 1) and info.block_width == 18
        assert len(info.relative_gains) == info.n_iter
        exact = torch.linalg.svdvals(A.double())
        ratio = frobenius_error(A, U, S, Vh) / max(float(exact[8:].norm()), 1e-30)
        if name != "low_rank":
            assert ratio <= 1 + AUTO_TOL, (name, ratio)
        else:  # rank 5 < k: the first block holds the whole range
            torch.testing.assert_close(S.double(), exact[:8], atol=1e-5 * float(exact[0]), rtol=0)
        steps[name] = info.n_iter
    assert steps["low_rank"] == 1  # 4 passes where the old fixed default made 6
    assert steps["decaying"] == 2
    assert steps["flat"] >= 3
    assert max(steps.values()) <= AUTO_MAX_N_ITER


def test_auto_stops_with_the_basis_a_fixed_n_iter_builds():
    """Stopping after q steps gives the result of n_iter=q: the check only reads the iteration."""
    A = spectrum_tensor(power_law(150, 0.7), 200, 150, seed=22)
    (U, S, Vh), info = randomized_svd(A, 10, seed=4, return_info=True)
    fixed = randomized_svd(A, 10, seed=4, n_iter=info.n_iter)
    for x, y in zip((U, S, Vh), fixed):
        assert torch.equal(x, y)
    flat = torch.from_numpy(np.random.default_rng(23).standard_normal((300, 250)))  # more than 3 blocks
    (U, S, Vh), info = randomized_svd(flat, 6, seed=4, return_info=True)
    assert info.n_iter >= 3
    fixed = randomized_svd(flat, 6, seed=4, n_iter=info.n_iter)
    torch.testing.assert_close(S, fixed.S, atol=1e-12, rtol=0)
    torch.testing.assert_close((U * S) @ Vh, (fixed.U * fixed.S) @ fixed.Vh, atol=1e-10, rtol=0)


def test_auto_stops_at_the_documented_maximum(monkeypatch):
    monkeypatch.setattr(randomized_module, "AUTO_TOL", 0.0)  # never settles on a flat float64 spectrum
    A = torch.from_numpy(np.random.default_rng(24).standard_normal((200, 300)))
    (U, S, Vh), info = randomized_svd(A, 10, seed=0, return_info=True)
    assert (info.n_iter, info.passes, info.converged) == (AUTO_MAX_N_ITER, 2 * (AUTO_MAX_N_ITER + 1), False)
    assert_orthonormal_columns(U, 1e-10)  # the basis grew past its first three blocks
    assert_orthonormal_columns(Vh.mT, 1e-10)
    exact = torch.linalg.svdvals(A)
    assert bool((S <= exact[:10] * (1 + 1e-10)).all())
    # Fewer blocks fit than the maximum: the cap is the short side (l = 20, r = 60: three blocks).
    (_, _, _), info = randomized_svd(A[:60], 10, seed=0, return_info=True)
    assert info.n_iter == 2 and info.converged is False


def test_a_batch_stops_when_every_matrix_has_settled():
    rng = np.random.default_rng(25)
    low_rank = rng.standard_normal((120, 3)) @ rng.standard_normal((3, 100))
    flat = rng.standard_normal((120, 100))
    batch = torch.from_numpy(np.stack([low_rank, flat]))
    (U, S, Vh), info = randomized_svd(batch, 5, seed=0, return_info=True)
    _, alone = randomized_svd(batch[1], 5, seed=0, return_info=True)
    assert info.n_iter == alone.n_iter >= 2
    torch.testing.assert_close(S[0, :3], torch.linalg.svdvals(batch[0])[:3], atol=1e-10, rtol=1e-10)
    for i in range(2):
        exact = torch.linalg.svdvals(batch[i])
        assert frobenius_error(batch[i], U[i], S[i], Vh[i]) <= float(exact[5:].norm()) * (1 + AUTO_TOL) + 1e-9


@settings(max_examples=20, deadline=None)
@given(
    m=st.integers(60, 160),
    n=st.integers(60, 160),
    k=st.integers(2, 12),
    alpha=st.floats(0.3, 2.0),
    seed=st.integers(0, 2**16),
)
def test_auto_error_is_within_the_tolerance_of_the_optimum(m, n, k, alpha, seed):
    """float64 (rounding far below the tolerance): ||A - A_k||_F**2 within ~AUTO_TOL of Eckart-Young."""
    s = power_law(min(m, n), alpha)
    A = spectrum_tensor(s, m, n, seed=seed, dtype=torch.float64)
    (U, S, Vh), info = randomized_svd(A, k, seed=seed, return_info=True)
    excess = frobenius_error(A, U, S, Vh) ** 2 / optimal_error(s, k) ** 2 - 1
    # The rule extrapolates the remaining gain geometrically; allow it to be off by 3x.
    assert excess <= 3 * AUTO_TOL or info.converged is False, (excess, info)
    assert excess >= -1e-9


def test_fixed_n_iter_reports_its_passes_and_no_convergence():
    A = torch.randn(120, 80, generator=torch.Generator().manual_seed(0))
    for n_iter in (0, 1, 3):
        _, info = randomized_svd(A, 3, n_iter=n_iter, seed=0, return_info=True)
        assert (info.method, info.n_iter, info.passes, info.converged, info.relative_gains) == ("krylov", n_iter, 2 * (n_iter + 1), None, ())
    _, info = randomized_svd(A, 3, method="subspace", seed=0, return_info=True)
    assert (info.method, info.n_iter, info.passes) == ("subspace", 7, 16)  # k < 0.1 min(m, n): scikit-learn's 7
    _, info = randomized_svd(A, 35, seed=0, return_info=True)  # l = 45, 2 l > 80: exact
    assert (info.method, info.passes) == ("exact", 0)


# --------------------------------------------------------------------------- seeds and output range


@pytest.mark.parametrize("seed", [1.5, 2.0, "a", True, np.float64(3.0), [1]])
def test_a_seed_that_is_not_an_int_is_refused(seed):
    with pytest.raises(TypeError, match=rf"seed must be an int, a torch.Generator or None, got {re.escape(repr(seed))}"):
        randomized_svd(torch.ones(30, 20), 3, seed=seed)


def test_seed_range_and_integer_types():
    A = torch.randn(30, 20, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"seed must fit in 64 bits.*got 18446744073709551616"):
        randomized_svd(A, 3, seed=2**64)
    assert torch.equal(randomized_svd(A, 3, seed=np.int64(7)).S, randomized_svd(A, 3, seed=7).S)
    randomized_svd(A, 3, seed=-1)  # negative seeds are valid generator seeds
    randomized_svd(A, 3, seed=2**64 - 1)


def test_layer_seed_is_one_formula_and_always_a_valid_seed():
    assert [layer_seed(0, i) for i in range(3)] == [0, 1, 2]
    assert layer_seed(3, 2) == 3 * 1_000_003 + 2 and layer_seed(np.int64(3), np.int64(2)) == layer_seed(3, 2)
    for seed in (-1, -(2**63), 2**62, 2**64 - 1):  # any 64-bit seed, also those whose product overflows 64 bits
        for index in (0, 7):
            value = layer_seed(seed, index)
            assert 0 <= value < 2**63 - 1 and value == (seed * 1_000_003 + index) % (2**63 - 1)
            torch.Generator().manual_seed(value)
    assert len({layer_seed(11, i) for i in range(1000)}) == 1000  # distinct per layer
    for seed, index in ((1.5, 0), (True, 0), (0, 1.0), ("1", 0)):
        with pytest.raises(TypeError, match="layer_seed: (seed|index) must be an int"):
            layer_seed(seed, index)
    with pytest.raises(ValueError, match="index must be >= 0, got -1"):
        layer_seed(0, -1)


def test_half_precision_result_that_overflows_raises():
    A = torch.full((60, 40), 2000.0, dtype=torch.float16)  # s_1 = sqrt(2400) * 2000 = 9.8e4 > 65504
    with pytest.raises(ValueError, match=r"largest singular value 9.798e\+04 overflows torch.float16"):
        randomized_svd(A, 2, seed=0)
    S = randomized_svd(A.float(), 2, seed=0).S
    assert float(S[0]) == pytest.approx(np.sqrt(2400) * 2000, rel=1e-5)
