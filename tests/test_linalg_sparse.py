"""Sparse input: randomized_svd on scipy.sparse and torch sparse matrices by products only; a clear refusal elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from svdkit.linalg import randomized_svd, stable_rank, svd, svdvals, truncated_svd

sparse = pytest.importorskip("scipy.sparse")

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Sparse CS. tensor support is in beta"),
]

SCIPY_FORMATS = ["csr", "csc", "coo"]
TORCH_LAYOUTS = ["coo", "csr", "csc"]


def random_sparse(m: int, n: int, density: float, seed: int, dtype=np.float64):
    """A scipy CSR matrix with Gaussian entries, and a decaying scale per column so the spectrum decays."""
    rng = np.random.default_rng(seed)
    M = sparse.random(m, n, density=density, random_state=rng, format="csr", data_rvs=rng.standard_normal)
    M = M @ sparse.diags(np.arange(1, n + 1, dtype=np.float64) ** -0.5)
    return sparse.csr_matrix(M, dtype=dtype)


def as_torch(M, layout: str, dtype=torch.float64) -> torch.Tensor:
    dense = torch.from_numpy(M.toarray()).to(dtype)  # built here from the reference, not by the library
    return {"coo": dense.to_sparse, "csr": dense.to_sparse_csr, "csc": dense.to_sparse_csc}[layout]()


@pytest.fixture
def no_densify(monkeypatch):
    """Any attempt to densify a sparse input fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the sparse input was densified")

    for cls in (sparse.csr_matrix, sparse.csc_matrix, sparse.coo_matrix, sparse.csr_array, sparse.csc_array, sparse.coo_array):
        monkeypatch.setattr(cls, "toarray", refuse)
        monkeypatch.setattr(cls, "todense", refuse)
    monkeypatch.setattr(torch.Tensor, "to_dense", refuse)


def check_factors(A_dense: np.ndarray, U, S, Vh, k: int, *, atol: float) -> None:
    m, n = A_dense.shape
    assert U.shape == (m, k) and S.shape == (k,) and Vh.shape == (k, n)
    np.testing.assert_allclose(U.T @ U, np.eye(k), atol=atol)
    np.testing.assert_allclose(Vh @ Vh.T, np.eye(k), atol=atol)
    exact = np.linalg.svd(A_dense, compute_uv=False)
    assert np.all(S <= exact[:k] * (1 + 1e-6) + atol)  # Ritz values interlace
    err = np.linalg.norm(A_dense - (U * S) @ Vh)
    assert err >= np.sqrt(np.sum(exact[k:] ** 2)) * (1 - 1e-6) - atol  # never beats Eckart-Young


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(30, 90),
    n=st.integers(30, 90),
    density=st.floats(0.05, 0.5),
    k=st.integers(1, 5),
    container=st.sampled_from([("scipy", f) for f in SCIPY_FORMATS] + [("torch", f) for f in TORCH_LAYOUTS]),
    method=st.sampled_from(["krylov", "subspace"]),
    n_iter=st.sampled_from([0, 1, 2]),
    seed=st.integers(0, 2**16),
)
def test_sparse_matches_the_dense_computation(m, n, density, k, container, method, n_iter, seed):
    """Same products, same sketch: the sparse result is the dense one up to rounding."""
    M = random_sparse(m, n, density, seed)
    kind, fmt = container
    A = M.asformat(fmt) if kind == "scipy" else as_torch(M, fmt)
    dense = M.toarray()
    got = randomized_svd(A, k, seed=seed, method=method, n_iter=n_iter)
    ref = randomized_svd(dense, k, seed=seed, method=method, n_iter=n_iter)
    if kind == "scipy":
        assert all(isinstance(x, np.ndarray) and x.dtype == np.float64 for x in got)
    else:
        assert all(isinstance(x, torch.Tensor) and x.dtype == torch.float64 for x in got)
        got = [x.numpy() for x in got]
    np.testing.assert_allclose(got[1], ref.S, atol=1e-9 * max(1.0, ref.S[0]), rtol=0)
    np.testing.assert_allclose((got[0] * got[1]) @ got[2], (ref.U * ref.S) @ ref.Vh, atol=1e-8, rtol=0)
    check_factors(dense, *got, k, atol=1e-9)


@pytest.mark.parametrize("method", ["krylov", "subspace"])
@pytest.mark.parametrize("container", [("scipy", "csr"), ("scipy", "coo"), ("torch", "coo"), ("torch", "csr")])
@pytest.mark.parametrize("shape", [(400, 250), (250, 400)], ids=["tall", "wide"])
def test_default_call_never_densifies_and_is_near_optimal(no_densify, method, container, shape):
    M = random_sparse(*shape, 0.05, seed=1)
    kind, fmt = container
    # The reference is built from the stored entries directly (toarray is patched to fail).
    dense = np.zeros(shape)
    coo = M.tocoo()
    np.add.at(dense, (coo.row, coo.col), coo.data)
    A = M.asformat(fmt) if kind == "scipy" else torch.sparse_coo_tensor(
        torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64)), torch.from_numpy(coo.data), shape, check_invariants=True
    ).coalesce()
    if kind == "torch" and fmt == "csr":
        A = A.to_sparse_csr()
    k = 10
    (U, S, Vh), info = randomized_svd(A, k, seed=0, method=method, return_info=True)
    U, S, Vh = (x.numpy() if isinstance(x, torch.Tensor) else x for x in (U, S, Vh))
    check_factors(dense, U, S, Vh, k, atol=1e-9)
    exact = np.linalg.svd(dense, compute_uv=False)
    ratio = np.linalg.norm(dense - (U * S) @ Vh) / np.sqrt(np.sum(exact[k:] ** 2))
    assert ratio <= 1.003, (ratio, info)
    assert info.method == method and info.passes == 2 * (info.n_iter + 1)


@pytest.mark.parametrize("shape", [(500, 20), (20, 500)])
@pytest.mark.parametrize("kind", ["scipy", "torch"])
def test_short_side_within_the_sketch_is_exact_by_products(no_densify, shape, kind):
    """Where a dense input takes the exact SVD, a sparse one takes Rayleigh-Ritz on the identity."""
    rng = np.random.default_rng(2)
    dense = rng.standard_normal(shape) * (rng.random(shape) < 0.3)
    A = sparse.csr_matrix(dense) if kind == "scipy" else torch.from_numpy(dense).to_sparse()
    (U, S, Vh), info = randomized_svd(A, 6, seed=0, return_info=True)
    assert (info.method, info.passes) == ("exact", 1)
    U, S, Vh = (np.asarray(x) for x in (U, S, Vh))
    Ue, Se, Vhe = np.linalg.svd(dense, full_matrices=False)
    np.testing.assert_allclose(S, Se[:6], atol=1e-12, rtol=0)
    np.testing.assert_allclose((U * S) @ Vh, (Ue[:, :6] * Se[:6]) @ Vhe[:6], atol=1e-11, rtol=0)


def test_dtypes_and_the_input_left_untouched():
    M = random_sparse(120, 80, 0.1, seed=3, dtype=np.float32)
    S32 = randomized_svd(M, 4, seed=0).S
    assert S32.dtype == np.float32
    S64 = randomized_svd(M.astype(np.float64), 4, seed=0).S
    np.testing.assert_allclose(S32, S64, rtol=1e-4)
    ints = sparse.csr_matrix(np.eye(30, 20, dtype=np.int64) * 3)
    S = randomized_svd(ints, 2, seed=0).S
    assert S.dtype == np.float64
    np.testing.assert_allclose(S, [3.0, 3.0])
    T = as_torch(M, "csr", torch.float16)
    Sh = randomized_svd(T, 4, seed=0).S
    assert Sh.dtype == torch.float16
    # A non-canonical matrix (duplicate entries, summed on use) is not modified.
    dup = sparse.coo_matrix((np.array([1.0, 2.0, 5.0]), (np.array([0, 0, 3]), np.array([1, 1, 2]))), shape=(40, 30)).tocsr(copy=False)
    dup = sparse.csr_matrix((dup.data, dup.indices, dup.indptr), shape=dup.shape)
    before = (dup.data.copy(), dup.indices.copy(), dup.indptr.copy())
    S = randomized_svd(dup, 2, seed=0).S
    np.testing.assert_allclose(S, [5.0, 3.0], rtol=1e-12)
    for x, y in zip(before, (dup.data, dup.indices, dup.indptr)):
        np.testing.assert_array_equal(x, y)


def test_non_finite_stored_entries_are_counted():
    M = random_sparse(60, 40, 0.2, seed=4)
    M.data[:3] = [np.nan, np.inf, np.nan]
    with pytest.raises(ValueError, match=r"\(60, 40\) has non-finite entries: 2 NaN and 1 Inf"):
        randomized_svd(M, 3, seed=0)
    T = as_torch(random_sparse(60, 40, 0.2, seed=4), "coo")
    values = T.values().clone()
    values[0] = float("inf")
    T = torch.sparse_coo_tensor(T.indices(), values, T.shape, check_invariants=True)
    with pytest.raises(ValueError, match=r"0 NaN and 1 Inf"):
        randomized_svd(T, 3, seed=0, method="subspace")


def test_sparse_shapes_and_layouts_that_are_refused():
    with pytest.raises(ValueError, match=r"single 2-D matrix.*shape \(2, 5, 4\).*once per matrix"):
        randomized_svd(torch.ones(2, 5, 4).to_sparse(), 2)
    with pytest.raises(ValueError, match="empty"):
        randomized_svd(sparse.csr_matrix((0, 5)), 1)
    with pytest.raises(TypeError, match=r"COO, CSR and CSC.*sparse_bsr.*to_sparse_csr"):
        randomized_svd(torch.ones(4, 4).to_sparse_bsr((2, 2)), 1)
    with pytest.raises(TypeError, match="complex"):
        randomized_svd(sparse.csr_matrix(np.eye(4, dtype=np.complex128)), 1)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, min\(m, n\)\] = \[1, 4\]"):
        randomized_svd(sparse.csr_matrix(np.eye(4)), 5)


@pytest.mark.parametrize(
    "fn",
    [svd, svdvals, stable_rank, lambda A: truncated_svd(A, 2, svd_method="exact")],
    ids=["svd", "svdvals", "stable_rank", "truncated_svd_exact"],
)
@pytest.mark.parametrize("make", [lambda D: sparse.csr_matrix(D), lambda D: torch.from_numpy(D).to_sparse()], ids=["scipy", "torch"])
def test_dense_only_functions_say_so_and_point_to_randomized_svd(fn, make):
    with pytest.raises(TypeError, match=r"sparse input.*randomized_svd"):
        fn(make(np.eye(6)))


def test_truncated_svd_takes_sparse_input_on_the_randomized_route():
    M = random_sparse(200, 120, 0.1, seed=5)
    dense = M.toarray()
    for svd_method in ("randomized", "auto"):
        (U, S, Vh), stats = truncated_svd(M, 8, svd_method=svd_method, seed=1)
        (Ud, Sd, Vhd), dstats = truncated_svd(dense, 8, svd_method="randomized", seed=1)
        np.testing.assert_allclose(S, Sd, rtol=1e-10)
        assert stats.rank == 8
        assert stats.relative_error == pytest.approx(dstats.relative_error, rel=1e-9)
        assert stats.relative_error == pytest.approx(np.linalg.norm(dense - (U * S) @ Vh) / np.linalg.norm(dense), rel=1e-6)
    from svdkit.linalg import Energy

    with pytest.raises(TypeError, match=r"truncated_svd\(\) of sparse input.*int rank.*Energy"):
        truncated_svd(M, Energy(0.9), svd_method="randomized")


def test_sum_of_squares_is_accurate_in_float32_and_survives_overflow():
    """||A||_F**2 feeds the n_iter="auto" rule: accurate to a few float32 roundings (the rule's
    residual floor is 8 of them), not the 0.4 % of a float32 norm of millions of entries."""
    from svdkit.linalg._sparse import sum_squares

    X = torch.randn(1500, 3000, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 3000)
    ref = X.double().square().sum()
    assert float(abs(sum_squares(X, (-2, -1)) - ref) / ref) < 3e-7
    assert float(abs(sum_squares(X.mT, (-2, -1)) - ref) / ref) < 3e-7
    batch = X[:60].reshape(3, 20, 3000)
    torch.testing.assert_close(sum_squares(batch, (-2, -1)), batch.double().square().sum((-2, -1)), rtol=3e-7, atol=0)
    v = X.flatten()[: 3 * 8192 + 5]
    assert float(abs(sum_squares(v, (0,)) - v.double().square().sum()) / v.double().square().sum()) < 3e-7
    big = torch.full((4, 5), 1e30)  # squares overflow float32
    assert float(sum_squares(big, (-2, -1))) == pytest.approx(20 * 1e60, rel=1e-6)
