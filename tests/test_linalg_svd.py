"""svd(), svdvals() and svd_flip() against NumPy/SciPy on drawn shapes, and every error path."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from linalg_helpers import with_spectrum
from svdkit.linalg import SVDFallbackWarning, SVDResult, svd, svd_flip, svdvals

pytestmark = pytest.mark.usefixtures("one_thread")


SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- matrices


def make_matrix(kind: str, m: int, n: int, seed: int) -> np.ndarray:
    """A float64 (m, n) matrix of the named kind."""
    rng = np.random.default_rng(seed)
    r = min(m, n)
    if kind == "gaussian":
        return rng.standard_normal((m, n))
    if kind == "rank_deficient":
        rank = max(1, r // 2) if r > 1 else 1
        return rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n))
    if kind == "zero":
        return np.zeros((m, n))
    if kind == "ill_conditioned":  # cond = 1e12 (for r >= 2)
        return with_spectrum(np.logspace(0, -12, r), m, n, rng)
    raise ValueError(kind)


def _shape(kind: str, a: int, b: int) -> tuple[int, int]:
    lo, hi = sorted((a, b))
    return {"tall": (hi + 1, lo), "wide": (lo, hi + 1), "square": (a, a), "row": (1, a), "column": (a, 1)}[kind]


shapes = st.builds(
    _shape,
    st.sampled_from(["tall", "wide", "square", "row", "column"]),
    st.integers(1, 24),
    st.integers(1, 24),
)
kinds = st.sampled_from(["gaussian", "rank_deficient", "zero", "ill_conditioned"])
seeds = st.integers(0, 2**32 - 1)


# --------------------------------------------------------------------------- invariants


def largest_entry_positive(U: np.ndarray) -> bool:
    """The sign convention: in every column of U an entry of largest magnitude is positive."""
    return bool(np.all(U.max(axis=-2) >= np.abs(U).max(axis=-2)))


def check_thin_svd(A: np.ndarray, res: SVDResult, *, atol: float) -> None:
    U, S, Vh = res
    m, n = A.shape[-2:]
    k = min(m, n)
    assert U.shape == (*A.shape[:-2], m, k)
    assert S.shape == (*A.shape[:-2], k)
    assert Vh.shape == (*A.shape[:-2], k, n)
    ref = np.linalg.svd(A, compute_uv=False)
    scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
    np.testing.assert_allclose(S, ref, atol=atol * scale, rtol=0)
    assert np.all(np.diff(S, axis=-1) <= 0), "singular values must be descending"
    np.testing.assert_allclose((U * S[..., None, :]) @ Vh, A, atol=atol * scale, rtol=0)
    eye = np.eye(k)
    np.testing.assert_allclose(np.swapaxes(U, -1, -2) @ U, np.broadcast_to(eye, U.shape[:-2] + (k, k)), atol=atol)
    np.testing.assert_allclose(Vh @ np.swapaxes(Vh, -1, -2), np.broadcast_to(eye, U.shape[:-2] + (k, k)), atol=atol)
    assert largest_entry_positive(U)


def check_vectors_match_numpy(A: np.ndarray, res: SVDResult, *, atol: float) -> None:
    """Where a singular value is isolated, its vectors equal NumPy's after the same sign rule."""
    Un, Sn, Vhn = np.linalg.svd(A, full_matrices=False)
    Un, Vhn = svd_flip(Un, Vhn)
    smax = Sn.max(initial=0.0)
    if smax == 0:
        return
    gaps = np.full_like(Sn, np.inf)
    gaps[:-1] = np.minimum(gaps[:-1], Sn[:-1] - Sn[1:])
    gaps[1:] = np.minimum(gaps[1:], Sn[:-1] - Sn[1:])
    isolated = (gaps > 1e-2 * smax) & (Sn > 1e-2 * smax)
    for j in np.flatnonzero(isolated):
        np.testing.assert_allclose(res.U[:, j], Un[:, j], atol=atol)
        np.testing.assert_allclose(res.Vh[j], Vhn[j], atol=atol)


# --------------------------------------------------------------------------- svd / svdvals against numpy


@SETTINGS
@given(shape=shapes, kind=kinds, seed=seeds)
def test_svd_float64_matches_numpy(shape, kind, seed):
    A = make_matrix(kind, *shape, seed)
    res = svd(A)
    assert isinstance(res, SVDResult) and all(isinstance(x, np.ndarray) for x in res)
    assert res.U.dtype == np.float64
    check_thin_svd(A, res, atol=1e-10)
    check_vectors_match_numpy(A, res, atol=1e-8)
    np.testing.assert_allclose(svdvals(A), scipy.linalg.svdvals(A), atol=1e-12 * max(1.0, np.abs(A).max()), rtol=0)


@SETTINGS
@given(shape=shapes, kind=kinds, seed=seeds)
def test_svd_float32_tensor_matches_numpy(shape, kind, seed):
    A = make_matrix(kind, *shape, seed).astype(np.float32)
    res = svd(torch.from_numpy(A))
    assert all(isinstance(x, torch.Tensor) and x.dtype == torch.float32 for x in res)
    check_thin_svd(A.astype(np.float64), SVDResult(*(x.double().numpy() for x in res)), atol=2e-5)
    S = svdvals(torch.from_numpy(A))
    assert S.dtype == torch.float32
    torch.testing.assert_close(S, res.S, atol=2e-5 * max(1.0, float(np.abs(A).max())), rtol=0)


@SETTINGS
@given(
    batch=st.lists(st.integers(1, 3), min_size=1, max_size=2).map(tuple),
    shape=shapes,
    kind=kinds,
    seed=seeds,
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_batched_svd_matches_numpy(batch, shape, kind, seed, dtype):
    count = int(np.prod(batch))
    A = np.stack([make_matrix(kind, *shape, seed + i) for i in range(count)]).reshape(*batch, *shape).astype(dtype)
    res = svd(A)
    assert res.U.dtype == dtype
    atol = 2e-5 if dtype == np.float32 else 1e-10
    check_thin_svd(A.astype(np.float64), SVDResult(*(x.astype(np.float64) for x in res)), atol=atol)
    np.testing.assert_allclose(svdvals(A), res.S, atol=atol * max(1.0, float(np.abs(A).max(initial=0.0))), rtol=0)


def test_ill_conditioned_float64():
    """cond(A) = 1e12: the small singular values are still resolved in float64."""
    A = make_matrix("ill_conditioned", 60, 40, seed=3)
    S = svdvals(A)
    expected = np.logspace(0, -12, 40)
    np.testing.assert_allclose(S, expected, atol=1e-14, rtol=0)
    np.testing.assert_allclose(S, scipy.linalg.svd(A, compute_uv=False, lapack_driver="gesvd"), atol=1e-14, rtol=0)
    U, S2, Vh = svd(A)
    np.testing.assert_allclose((U * S2) @ Vh, A, atol=1e-13, rtol=0)
    assert S[0] / S[-1] == pytest.approx(1e12, rel=1e-2)


def test_rank_deficient_tail_is_zero():
    A = make_matrix("rank_deficient", 30, 20, seed=1)  # rank 10
    S = svdvals(A)
    assert np.all(S[:10] > 1e-3)
    assert np.all(S[10:] < 1e-12 * S[0])


def test_zero_matrix():
    U, S, Vh = svd(np.zeros((5, 3)))
    np.testing.assert_array_equal(S, np.zeros(3))
    np.testing.assert_allclose(U.T @ U, np.eye(3), atol=1e-15)
    np.testing.assert_allclose(Vh @ Vh.T, np.eye(3), atol=1e-15)
    assert largest_entry_positive(U)


def test_batched_matches_numpy():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((2, 3, 7, 5))
    A[1, 2] = 0.0  # a zero matrix inside the batch
    res = svd(A)
    assert res.U.shape == (2, 3, 7, 5) and res.S.shape == (2, 3, 5) and res.Vh.shape == (2, 3, 5, 5)
    check_thin_svd(A, res, atol=1e-12)
    for idx in np.ndindex(2, 3):
        single = svd(A[idx])
        np.testing.assert_allclose(res.U[idx], single.U, atol=1e-12)
        np.testing.assert_allclose(res.Vh[idx], single.Vh, atol=1e-12)
    np.testing.assert_allclose(svdvals(A), np.linalg.svd(A, compute_uv=False), atol=1e-12)


def test_full_matrices():
    A = np.random.default_rng(1).standard_normal((6, 4))
    U, S, Vh = svd(A, full_matrices=True)
    assert U.shape == (6, 6) and S.shape == (4,) and Vh.shape == (4, 4)
    np.testing.assert_allclose(U.T @ U, np.eye(6), atol=1e-12)
    np.testing.assert_allclose((U[:, :4] * S) @ Vh, A, atol=1e-12)
    assert largest_entry_positive(U[:, :4])
    Uw, Sw, Vhw = svd(A.T, full_matrices=True)
    assert Uw.shape == (4, 4) and Vhw.shape == (6, 6)
    np.testing.assert_allclose((Uw * Sw) @ Vhw[:4], A.T, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_in_same_dtype_out(dtype):
    A = torch.from_numpy(make_matrix("gaussian", 12, 8, seed=2)).to(dtype)
    U, S, Vh = svd(A)
    assert U.dtype == S.dtype == Vh.dtype == dtype
    assert svdvals(A).dtype == dtype
    # Computed in float32 from the same (rounded) input, then cast.
    ref = svd(A.float())
    torch.testing.assert_close(S, ref.S.to(dtype))
    torch.testing.assert_close(U, ref.U.to(dtype))
    tol = 3e-2 if dtype == torch.bfloat16 else 4e-3
    recon = (U.float() * S.float()) @ Vh.float()
    assert float((recon - A.float()).abs().max()) < tol * float(S[0])


def test_integer_input_is_decomposed_in_float():
    A = np.arange(12).reshape(3, 4)
    U, S, Vh = svd(A)
    assert S.dtype == np.float64
    np.testing.assert_allclose(S, np.linalg.svd(A.astype(float), compute_uv=False), atol=1e-12)
    St = svdvals(torch.arange(12).reshape(3, 4))
    assert St.dtype == torch.float32


def test_input_not_modified():
    A = torch.randn(9, 6)
    before = A.clone()
    svd(A)
    svdvals(A)
    assert torch.equal(A, before)


def test_row_and_column_vectors():
    row = np.array([[3.0, -4.0]])
    U, S, Vh = svd(row)
    np.testing.assert_allclose(S, [5.0])
    np.testing.assert_allclose(U, [[1.0]])
    np.testing.assert_allclose(Vh, [[0.6, -0.8]])
    U, S, Vh = svd(row.T)  # the largest entry of U, -0.8, is made positive
    np.testing.assert_allclose(U, [[-0.6], [0.8]])
    np.testing.assert_allclose(Vh, [[-1.0]])


# --------------------------------------------------------------------------- svd_flip


def test_svd_flip_u_and_v_based():
    rng = np.random.default_rng(4)
    A = rng.standard_normal((8, 5))
    U, S, Vh = np.linalg.svd(A, full_matrices=False)
    signs = np.array([1.0, -1.0, -1.0, 1.0, -1.0])
    Uf, Vhf = svd_flip(U * signs, signs[:, None] * Vh)
    assert largest_entry_positive(Uf)
    np.testing.assert_allclose((Uf * S) @ Vhf, A, atol=1e-12)
    # Both sign choices of the input land on the same output.
    Uf2, Vhf2 = svd_flip(U, Vh)
    np.testing.assert_allclose(Uf, Uf2)
    np.testing.assert_allclose(Vhf, Vhf2)
    Uv, Vhv = svd_flip(U * signs, signs[:, None] * Vh, u_based=False)
    assert largest_entry_positive(np.swapaxes(Vhv, -1, -2))
    np.testing.assert_allclose((Uv * S) @ Vhv, A, atol=1e-12)


def test_svd_flip_matches_sklearn():
    extmath = pytest.importorskip("sklearn.utils.extmath")
    rng = np.random.default_rng(5)
    U, _, Vh = np.linalg.svd(rng.standard_normal((7, 4)), full_matrices=False)
    for u_based in (True, False):
        ours = svd_flip(U, Vh, u_based=u_based)
        theirs = extmath.svd_flip(U.copy(), Vh.copy(), u_based_decision=u_based)
        np.testing.assert_allclose(ours[0], theirs[0])
        np.testing.assert_allclose(ours[1], theirs[1])


def test_svd_flip_tensor_batched():
    U = torch.tensor([[[-1.0, 0.0], [0.0, -1.0]], [[0.0, 1.0], [-1.0, 0.0]]])
    Vh = torch.eye(2).expand(2, 2, 2)
    Uf, Vhf = svd_flip(U, Vh)
    assert isinstance(Uf, torch.Tensor)
    torch.testing.assert_close(Uf, torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]]))
    torch.testing.assert_close(Uf @ Vhf, U @ Vh)


# --------------------------------------------------------------------------- error paths


@pytest.mark.parametrize("fn", [svd, svdvals])
def test_non_finite_input_message(fn):
    A = torch.ones(3, 4)
    A[0, 1] = float("nan")
    A[2, 2] = float("nan")
    A[1, 3] = float("-inf")
    with pytest.raises(ValueError, match=re.escape("(3, 4)")) as info:
        fn(A)
    assert "2 NaN and 1 Inf" in str(info.value)
    B = np.ones((2, 2, 2))
    B[1, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"\(2, 2, 2\).*0 NaN and 1 Inf"):
        fn(B)


def test_large_finite_float16_values_are_decomposed_when_the_result_fits():
    # The cheap sum overflows to inf in float16 (4.1e6 > 65504), but every entry is finite and the
    # singular value 64 * 1000 = 64000 fits: it must come back exactly, not as inf or an error.
    A = torch.full((64, 64), 1000.0, dtype=torch.float16)
    assert not torch.isfinite(A.sum())
    S = svdvals(A)
    assert S.dtype == torch.float16
    assert float(S[0]) == 64000.0
    assert float(S[1:].float().abs().max()) <= 64000.0 * 2e-3
    U, S2, Vh = svd(A)
    torch.testing.assert_close(((U.float() * S2.float()) @ Vh.float()), A.float(), atol=64000.0 * 2e-3, rtol=0)


@pytest.mark.parametrize("fn", [svd, svdvals])
def test_singular_values_overflowing_float16_raise_instead_of_returning_inf(fn):
    A = torch.full((64, 64), 60000.0, dtype=torch.float16)  # s_1 = 64 * 60000 = 3.84e6 > 65504
    with pytest.raises(ValueError, match=r"\(64, 64\) \(torch.float16\): its largest singular value 3.84e\+06 overflows torch.float16"):
        fn(A)
    S = svdvals(A.float())  # the same matrix in float32 has the range
    assert float(S[0]) == pytest.approx(3.84e6, rel=1e-6)


@pytest.mark.parametrize("fn", [svd, svdvals])
def test_singular_values_overflowing_float32_raise_instead_of_returning_inf(fn):
    A = torch.full((60, 40), 3e38)  # finite entries, s_1 = sqrt(2400) * 3e38 > 3.4e38
    with pytest.raises(ValueError, match=r"\(60, 40\) \(torch.float32\) is finite but its singular values overflow torch.float32.*float64"):
        fn(A)
    S = svdvals(A.double())
    assert float(S[0]) == pytest.approx(np.sqrt(2400) * float(A[0, 0]), rel=1e-12)


@pytest.mark.filterwarnings("ignore:Sparse CS. tensor support is in beta")
@pytest.mark.parametrize("fn", [svd, svdvals])
def test_sparse_input_is_refused_with_a_pointer_to_randomized_svd(fn):
    sparse = pytest.importorskip("scipy.sparse")
    dense = np.eye(5)
    for A, what in [
        (torch.from_numpy(dense).to_sparse(), "torch.sparse_coo tensor"),
        (torch.from_numpy(dense).to_sparse_csr(), "torch.sparse_csr tensor"),
        (sparse.csr_matrix(dense), "scipy.sparse csr_matrix"),
        (sparse.coo_array(dense), "scipy.sparse coo_array"),
    ]:
        with pytest.raises(TypeError, match=rf"{fn.__name__}\(\) does not take sparse input \(got a {what} of shape \(5, 5\)\).*randomized_svd"):
            fn(A)


@pytest.mark.parametrize("fn", [svd, svdvals])
@pytest.mark.parametrize("shape", [(0, 3), (4, 0), (2, 0, 5)])
def test_empty_input(fn, shape):
    with pytest.raises(ValueError, match=re.escape(f"empty (shape {shape})")):
        fn(torch.zeros(shape))


@pytest.mark.parametrize("fn", [svd, svdvals])
@pytest.mark.parametrize("value", [np.ones(5), np.float64(2.0), torch.ones(3)])
def test_fewer_than_two_dimensions(fn, value):
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        fn(value)


def test_unsupported_types_and_driver():
    with pytest.raises(TypeError, match="complex"):
        svd(torch.ones(2, 2, dtype=torch.complex64))
    with pytest.raises(TypeError, match="torch.Tensor or numpy.ndarray"):
        svd("not a matrix")
    with pytest.raises(ValueError, match="driver"):
        svd(torch.ones(2, 2), driver="gesdd")
    with pytest.raises(ValueError, match="driver"):
        svdvals(torch.ones(2, 2), driver="magma")


# --------------------------------------------------------------------------- fallbacks


@pytest.fixture
def failing_linalg(monkeypatch):
    """Make torch.linalg.svd/svdvals raise LinAlgError for the dtypes listed in ``fail``."""
    real_svd, real_svdvals = torch.linalg.svd, torch.linalg.svdvals
    fail: set[torch.dtype] = set()
    calls: list[torch.dtype] = []

    def fake_svd(A, *args, **kwargs):
        calls.append(A.dtype)
        if A.dtype in fail:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge (error code: 3)")
        return real_svd(A, *args, **kwargs)

    def fake_svdvals(A, *args, **kwargs):
        calls.append(A.dtype)
        if A.dtype in fail:
            raise torch.linalg.LinAlgError("linalg.svdvals: The algorithm failed to converge (error code: 3)")
        return real_svdvals(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", fake_svd)
    monkeypatch.setattr(torch.linalg, "svdvals", fake_svdvals)
    return fail, calls


def test_fallback_to_float64(failing_linalg):
    fail, calls = failing_linalg
    fail.add(torch.float32)
    A = torch.from_numpy(make_matrix("gaussian", 9, 6, seed=7)).float()
    with pytest.warns(SVDFallbackWarning, match=r"\(9, 6\) torch.float32.*did not converge.*float64"):
        U, S, Vh = svd(A)
    assert calls == [torch.float32, torch.float64]
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    check_thin_svd(A.double().numpy(), SVDResult(U.double().numpy(), S.double().numpy(), Vh.double().numpy()), atol=1e-5)
    with pytest.warns(SVDFallbackWarning, match="svdvals.*float64"):
        S2 = svdvals(A)
    torch.testing.assert_close(S2, S)


def test_fallback_to_scipy_gesvd(failing_linalg, monkeypatch):
    fail, calls = failing_linalg
    fail.update({torch.float32, torch.float64})
    drivers: list[str] = []
    real_scipy_svd = scipy.linalg.svd

    def spy(*args, **kwargs):
        drivers.append(kwargs.get("lapack_driver"))
        return real_scipy_svd(*args, **kwargs)

    monkeypatch.setattr(scipy.linalg, "svd", spy)
    A = make_matrix("gaussian", 2 * 5 * 4, 1, seed=8).reshape(2, 5, 4).astype(np.float32)
    with pytest.warns(SVDFallbackWarning, match="scipy's gesvd"):
        res = svd(A)
    assert drivers == ["gesvd", "gesvd"]  # one per matrix of the batch
    assert calls == [torch.float32, torch.float64]
    assert res.U.dtype == np.float32
    check_thin_svd(A.astype(np.float64), SVDResult(*(x.astype(np.float64) for x in res)), atol=1e-5)
    with pytest.warns(SVDFallbackWarning, match="scipy's gesvd"):
        S = svdvals(A)
    np.testing.assert_allclose(S, np.linalg.svd(A.astype(np.float64), compute_uv=False), atol=1e-5)


def test_float64_input_skips_the_float64_route(failing_linalg):
    fail, calls = failing_linalg
    fail.add(torch.float64)
    A = make_matrix("gaussian", 5, 5, seed=9)
    with pytest.warns(SVDFallbackWarning, match="scipy's gesvd"):
        S = svdvals(A)
    assert calls == [torch.float64]
    np.testing.assert_allclose(S, np.linalg.svd(A, compute_uv=False), atol=1e-12)


def test_every_route_failing_raises_the_first_error(failing_linalg, monkeypatch):
    fail, _ = failing_linalg
    fail.update({torch.float32, torch.float64})

    def broken(*args, **kwargs):
        raise np.linalg.LinAlgError("SVD did not converge")

    monkeypatch.setattr(scipy.linalg, "svd", broken)
    with pytest.raises(torch.linalg.LinAlgError, match="error code: 3"):
        svd(torch.ones(3, 3))
    with pytest.raises(torch.linalg.LinAlgError, match="error code: 3"):
        svdvals(torch.ones(3, 3))


def test_without_scipy_the_last_fallback_reraises_the_original_error(failing_linalg, monkeypatch):
    """SciPy is optional: when it is missing, the user sees the LAPACK failure, not an ImportError."""
    fail, calls = failing_linalg
    fail.update({torch.float32, torch.float64})
    monkeypatch.setitem(sys.modules, "scipy.linalg", None)  # `import scipy.linalg` now raises ImportError
    for fn in (svd, svdvals):
        calls.clear()
        with pytest.raises(torch.linalg.LinAlgError, match="error code: 3") as info:
            fn(torch.ones(3, 3))
        assert calls == [torch.float32, torch.float64]  # the float64 route was still tried
        assert any("scipy is not installed" in note for note in getattr(info.value, "__notes__", ["scipy is not installed"]))
    # With only float32 failing, the float64 route still rescues the call without SciPy.
    fail.discard(torch.float64)
    with pytest.warns(SVDFallbackWarning, match="float64"):
        S = svdvals(torch.eye(3))
    torch.testing.assert_close(S, torch.ones(3))


def test_fallback_warning_is_not_emitted_without_failure(recwarn):
    svd(torch.randn(4, 3))
    assert not [w for w in recwarn if issubclass(w.category, SVDFallbackWarning)]


# --------------------------------------------------------------------------- devices


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stays_on_cuda_and_matches_cpu():
    rng = np.random.default_rng(10)
    A = torch.from_numpy(with_spectrum(np.geomspace(1.0, 1e-2, 30), 40, 30, rng)).float()  # well-separated values
    res = svd(A.cuda())
    assert all(x.is_cuda for x in res)
    ref = svd(A)
    torch.testing.assert_close(res.S.cpu(), ref.S, atol=1e-4, rtol=0)
    # The sign convention makes the vectors agree across devices.
    torch.testing.assert_close(res.U.cpu()[:, :10], ref.U[:, :10], atol=1e-3, rtol=0)
    torch.testing.assert_close(res.Vh.cpu()[:10], ref.Vh[:10], atol=1e-3, rtol=0)
    for driver in ("gesvd", "gesvdj", "gesvda"):
        torch.testing.assert_close(svdvals(A.cuda(), driver=driver).cpu(), ref.S, atol=1e-3, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_falls_back_to_gesvd(monkeypatch):
    real_svd = torch.linalg.svd
    drivers: list[str | None] = []

    def fake(A, *args, driver=None, **kwargs):
        drivers.append(driver)
        if driver != "gesvd":
            raise torch.linalg.LinAlgError("cusolver gesvdj failed to converge")
        return real_svd(A, *args, driver=driver, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", fake)
    A = torch.randn(20, 10, device="cuda")
    with pytest.warns(SVDFallbackWarning, match="CUDA gesvd driver"):
        U, S, Vh = svd(A)
    assert drivers == [None, "gesvd"]
    assert U.is_cuda
    torch.testing.assert_close((U * S) @ Vh, A, atol=1e-4, rtol=0)
