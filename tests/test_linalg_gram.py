"""gram_svd(): the thin SVD from the smaller Gram matrix, against NumPy's SVD."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from svdkit.linalg import gram_svd


def _matrix(m: int, n: int, decay: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((m, min(m, n))))
    V, _ = np.linalg.qr(rng.standard_normal((n, min(m, n))))
    s = np.arange(1, min(m, n) + 1, dtype=np.float64) ** -decay
    return (U * s) @ V.T


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 40), decay=st.floats(0.0, 2.0), seed=st.integers(0, 10))
def test_values_and_truncations_match_numpy(m, n, decay, seed):
    A = _matrix(m, n, decay, seed)
    U, S, Vh = gram_svd(torch.from_numpy(A))
    s_ref = np.linalg.svd(A, compute_uv=False)
    np.testing.assert_allclose(S.numpy(), s_ref, rtol=1e-9, atol=1e-12 * s_ref[0])
    for k in range(1, min(m, n) + 1):
        best = np.linalg.norm(A, "fro") ** 2 - (s_ref[:k] ** 2).sum()  # Eckart-Young
        error = np.linalg.norm(A - (U[:, :k] * S[:k] @ Vh[:k]).numpy(), "fro") ** 2
        assert error == pytest.approx(max(best, 0.0), abs=1e-9 * s_ref[0] ** 2)


@pytest.mark.parametrize("shape", [(60, 20), (20, 60)])
def test_vectors_are_orthonormal_and_sign_fixed(shape):
    A = torch.from_numpy(_matrix(*shape, decay=0.5, seed=1))
    U, S, Vh = gram_svd(A)
    eye = torch.eye(20, dtype=torch.float64)
    torch.testing.assert_close(U.T @ U, eye, atol=1e-10, rtol=0)
    torch.testing.assert_close(Vh @ Vh.T, eye, atol=1e-10, rtol=0)
    largest = U.abs().argmax(0)
    assert bool((U[largest, torch.arange(20)] > 0).all())  # u-based sign rule


def test_a_rank_deficient_matrix_is_reproduced_and_zero_columns_stay_zero():
    rng = np.random.default_rng(3)
    A = torch.from_numpy(rng.standard_normal((30, 4)) @ rng.standard_normal((4, 12)))
    U, S, Vh = gram_svd(A)
    torch.testing.assert_close((U[:, :4] * S[:4]) @ Vh[:4], A, atol=1e-10, rtol=0)
    zero = gram_svd(torch.zeros(5, 3))
    assert bool((zero.S == 0).all()) and bool((zero.U == 0).all())


def test_bad_input():
    with pytest.raises(ValueError, match="one matrix"):
        gram_svd(torch.zeros(2, 3, 4))
    with pytest.raises(TypeError, match="dense"):
        gram_svd(torch.eye(3).to_sparse())
