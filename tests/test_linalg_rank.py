"""The rank vocabulary: every spec, its construction, JSON form, resolve_rank() and its error paths."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from svdkit.linalg import Energy, ErrorTol, ParamRatio, RankRatio, RankSpec, rank_from_dict, resolve_rank

S = np.array([4.0, 3.0, 2.0, 1.0, 0.5, 0.0])  # energies 16, 9, 4, 1, 0.25, 0 of 30.25
SHAPE = (6, 10)


# --------------------------------------------------------------------------- construction


@pytest.mark.parametrize(
    "cls,good,bad,message",
    [
        (Energy, [1e-9, 0.5, 1.0, 1], [0.0, -0.1, 1.0001, 2], r"Energy\(value=.*\): the energy fraction must be in \(0, 1\]"),
        (RankRatio, [1e-9, 0.25, 1.0], [0.0, -0.5, 1.5], r"RankRatio\(value=.*\): the ratio must be in \(0, 1\]"),
        (ParamRatio, [1e-9, 0.6, 1.0, 1], [0.0, -1.0, 1.0001, 3.0], r"ParamRatio\(value=.*\): the ratio must be in \(0, 1\]"),
        (ErrorTol, [0.0, 0.05, 0.999], [1.0, -0.01, 5.0], r"ErrorTol\(value=.*\): the tolerance must be in \[0, 1\)"),
    ],
)
def test_spec_construction(cls, good, bad, message):
    for value in good:
        spec = cls(value)
        assert isinstance(spec, RankSpec) and spec.value == value
    for value in bad:
        with pytest.raises(ValueError, match=message):
            cls(value)
    for value in (math.nan, math.inf, "0.5", None, True):
        with pytest.raises(ValueError, match=rf"{cls.__name__} needs a finite number, got"):
            cls(value)
    spec = cls(good[1])
    with pytest.raises(AttributeError):
        spec.value = 0.1  # frozen
    assert cls(good[1]) == spec and hash(cls(good[1])) == hash(spec)


@pytest.mark.parametrize("spec", [Energy(0.95), RankRatio(0.25), ParamRatio(0.6), ErrorTol(0.05)])
def test_json_round_trip(spec):
    data = spec.to_dict()
    assert set(data) == {"kind", "value"}
    assert rank_from_dict(json.loads(json.dumps(data))) == spec


def test_rank_from_dict_passes_ints_and_rejects_the_rest():
    assert rank_from_dict(7) == 7
    for bad in ({"kind": "energy"}, {"kind": "percent", "value": 3}, {"value": 0.5}, "energy", 0.5, True, None):
        with pytest.raises(ValueError, match="not a rank spec"):
            rank_from_dict(bad)
    with pytest.raises(ValueError, match="Energy"):
        rank_from_dict({"kind": "energy", "value": 2.0})


# --------------------------------------------------------------------------- resolve_rank


def test_int_ranks():
    assert resolve_rank(None, 3, SHAPE) == 3
    assert resolve_rank(None, np.int64(3), SHAPE) == 3
    assert resolve_rank(None, 100, SHAPE) == 6  # capped at min(m, n)
    for bad in (0, -2):
        with pytest.raises(ValueError, match=rf"rank {bad} for a 6x10 matrix: a rank must be >= 1"):
            resolve_rank(None, bad, SHAPE)


def test_rank_ratio():
    assert resolve_rank(None, RankRatio(0.5), SHAPE) == 3
    assert resolve_rank(None, RankRatio(0.7), SHAPE) == 4  # floor(4.2)
    assert resolve_rank(None, RankRatio(1.0), SHAPE) == 6
    assert resolve_rank(None, RankRatio(0.01), SHAPE) == 1  # at least 1
    # 0.29 * 100 = 28.999999999999996 in floating point: still 29
    assert resolve_rank(None, RankRatio(0.29), (100, 100)) == 29


def test_param_ratio():
    # break-even m n / (m + n) = 60 / 16 = 3.75
    assert resolve_rank(None, ParamRatio(1.0), SHAPE) == 3
    assert resolve_rank(None, ParamRatio(0.5), SHAPE) == 1
    assert resolve_rank(None, ParamRatio(0.01), SHAPE) == 1
    # A square matrix at the break-even ratio: k (m + n) = m n exactly, never more parameters than dense.
    assert resolve_rank(None, ParamRatio(1.0), (8, 8)) == 4
    k = resolve_rank(None, ParamRatio(0.6), (4096, 11008))
    assert k == math.floor(0.6 * 4096 * 11008 / (4096 + 11008))
    assert k * (4096 + 11008) <= 0.6 * 4096 * 11008 < (k + 1) * (4096 + 11008)


@pytest.mark.parametrize("value", [1.0001, 2, 3.0, 100.0])
def test_param_ratio_above_one_is_refused_with_the_reason(value):
    """A "compression" keeping more parameters than the dense matrix is a mistake, not a rank."""
    with pytest.raises(ValueError, match=rf"ParamRatio\(value={value!r}\).*\(0, 1\].*larger than the dense matrix"):
        ParamRatio(value)


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 500), n=st.integers(1, 500), value=st.floats(1e-6, 1.0))
def test_param_ratio_never_exceeds_the_dense_parameter_count(m, n, value):
    k = resolve_rank(None, ParamRatio(value), (m, n))
    # At least rank 1; beyond that the factors keep at most value * m * n parameters.
    assert k == 1 or k * (m + n) <= value * m * n * (1 + 1e-12)
    assert k * (m + n) <= m * n or k == 1


def test_energy():
    assert resolve_rank(S, Energy(16 / 30.25), SHAPE) == 1
    assert resolve_rank(S, Energy(16 / 30.25 + 1e-9), SHAPE) == 2
    assert resolve_rank(S, Energy(0.99), SHAPE) == 4
    assert resolve_rank(S, Energy(1.0), SHAPE) == 5  # the zero singular value is never needed
    assert resolve_rank(torch.tensor(S), Energy(0.99), SHAPE) == 4
    assert resolve_rank(np.zeros(6), Energy(0.9), SHAPE) == 1  # a zero matrix still gets rank 1


def test_error_tol():
    power = S**2
    for tol in (0.0, 0.01, 0.1, 0.2, 0.5, 0.9):
        k = resolve_rank(S, ErrorTol(tol), SHAPE)
        errors = [math.sqrt(power[j:].sum() / power.sum()) for j in range(len(S) + 1)]
        assert errors[k] <= tol + 1e-12
        assert k == 1 or errors[k - 1] > tol
    assert resolve_rank(S, ErrorTol(0.0), SHAPE) == 5
    assert resolve_rank(np.zeros(6), ErrorTol(0.1), SHAPE) == 1


@pytest.mark.parametrize("spec", [Energy(0.9), ErrorTol(0.1)])
def test_spectrum_specs_need_a_matching_spectrum(spec):
    with pytest.raises(ValueError, match=r"for a 6x10 matrix needs its singular values"):
        resolve_rank(None, spec, SHAPE)
    with pytest.raises(ValueError, match=r"for a 6x10 matrix: expected its min\(m, n\) = 6 singular values, got 7 "):
        resolve_rank(np.ones(7), spec, SHAPE)
    with pytest.raises(ValueError, match=r"got shape \(2, 3\)"):
        resolve_rank(np.ones((2, 3)), spec, SHAPE)


@pytest.mark.parametrize("spec", [Energy(0.9), ErrorTol(0.1)])
def test_a_spectrum_shorter_than_the_shape_is_refused(spec):
    # Energy(0.9) of the first four of six equal values would be rank 4; of all six it is rank 6
    with pytest.raises(ValueError, match=r"for a 6x10 matrix: expected its min\(m, n\) = 6 singular values, got 4 \(a spectrum of "
                                         r"another matrix, or a truncated one: pass the full spectrum of this matrix\)"):
        resolve_rank(np.ones(4), spec, SHAPE)


@pytest.mark.parametrize("spec", [0.5, "energy", None, True, {"kind": "energy", "value": 0.9}])
def test_unknown_specs_name_the_spec_and_shape(spec):
    with pytest.raises(ValueError, match=r"unknown rank spec .* for a 6x10 matrix"):
        resolve_rank(S, spec, SHAPE)


@pytest.mark.parametrize("shape", [(0, 4), (3,), (1, 2, 3), (-1, 5)])
def test_bad_shapes(shape):
    with pytest.raises(ValueError, match="shape must be"):
        resolve_rank(None, 2, shape)


specs = st.one_of(
    st.integers(1, 10_000),
    st.floats(1e-6, 1.0).map(Energy),
    st.floats(1e-6, 1.0).map(RankRatio),
    st.floats(1e-6, 1.0).map(ParamRatio),
    st.floats(0.0, 0.999).map(ErrorTol),
)


@settings(max_examples=150, deadline=None)
@given(m=st.integers(1, 300), n=st.integers(1, 300), spec=specs, seed=st.integers(0, 2**16), zero=st.booleans())
def test_result_is_always_between_1_and_min_m_n(m, n, spec, seed, zero):
    r = min(m, n)
    s = np.zeros(r) if zero else np.sort(np.random.default_rng(seed).exponential(size=r))[::-1]
    k = resolve_rank(s, spec, (m, n))
    assert type(k) is int
    assert 1 <= k <= r
