"""Ranks in multiples and under caps: the allocator, per-layer specs, the budget and the config."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from svdkit.compression import CompressConfig, compress
from svdkit.linalg import Energy, ErrorTol, allocate_ranks, round_rank
from svdkit.speed import SpeedTarget, using_costs

from compression_helpers import mlp


class FixedCaps:
    """A cost model with given caps per shape (the largest rank faster than dense)."""

    def __init__(self, caps: dict[tuple[int, int], int]) -> None:
        self.target = SpeedTarget()
        self.caps = caps
        self.asked: list[tuple[int, int]] = []

    def largest_faster_rank(self, m: int, n: int) -> int:
        self.asked.append((m, n))
        return self.caps[(m, n)]

    def describe(self) -> str:
        return "fixed caps of the test"


def _spent(ranks, costs, dense_costs):
    return sum(d if k is None else k * c for k, c, d in zip(ranks, costs, dense_costs))


@settings(max_examples=120, deadline=None)
@given(
    st.lists(st.tuples(st.integers(4, 40), st.integers(1, 9), st.one_of(st.none(), st.integers(0, 40)), st.integers(0, 10_000)),
             min_size=1, max_size=5),
    st.floats(0.2, 1.0), st.integers(1, 3),
)
def test_allocated_ranks_are_multiples_under_their_caps_within_the_budget(layers, fraction, min_rank):
    spectra, costs, dense_costs, multiples, caps = [], [], [], [], []
    for size, multiple, cap, seed in layers:
        g = np.random.default_rng(seed)
        spectra.append(torch.tensor(np.sort(g.gamma(1.0, size=size))[::-1].copy()))
        costs.append(2 * size)
        dense_costs.append(size * size)
        multiples.append(multiple)
        caps.append(cap)
    firsts = [-(-min_rank // m) * m for m in multiples]
    forced = [min(len(S), len(S) if cap is None else cap) < first for S, cap, first in zip(spectra, caps, firsts)]
    cheapest = sum(d if f else first * c for f, first, c, d in zip(forced, firsts, costs, dense_costs))
    budget = int(fraction * sum(dense_costs))
    try:
        ranks = allocate_ranks(spectra, costs, dense_costs, budget, min_rank=min_rank, multiple=multiples, max_ranks=caps)
    except ValueError as exc:  # only when even the smallest choice does not fit
        assert "cannot keep rank" in str(exc) and cheapest > budget
        return
    assert cheapest <= budget
    assert _spent(ranks, costs, dense_costs) <= budget
    for k, m, cap, first, S in zip(ranks, multiples, caps, firsts, spectra):
        if k is None:
            continue
        assert k % m == 0 and k >= first and k <= len(S)
        assert cap is None or k <= cap
        assert k * 2 * len(S) < len(S) ** 2  # below break-even, or it would be dense
    for k, m, cap, first in zip(ranks, multiples, caps, firsts):
        if cap is not None and cap < first:
            assert k is None  # no rank it may take: dense


def _brute_force(spectra, costs, dense_costs, budget, multiple, caps):
    best = float("inf")
    choices = [[None] + [k for k in range(multiple, len(s) + 1, multiple) if cap is None or k <= cap] for s, cap in zip(spectra, caps)]
    for ks in itertools.product(*choices):
        if _spent(ks, costs, dense_costs) > budget:
            continue
        best = min(best, sum(0.0 if k is None else float((s[k:] ** 2).sum()) for s, k in zip(spectra, ks)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocation_in_multiples_is_near_the_best_choice_of_multiples(seed):
    g = np.random.default_rng(seed)
    spectra = [np.sort(g.gamma(1.0, size=12) * g.uniform(0.5, 3))[::-1].copy() for _ in range(3)]
    costs, dense_costs, multiple = [10] * 3, [100] * 3, 3
    caps = [None, int(g.integers(3, 9)), None]
    budget = int(g.integers(120, 260))
    ranks = allocate_ranks([torch.tensor(s) for s in spectra], costs, dense_costs, budget, multiple=multiple, max_ranks=caps)
    assert _spent(ranks, costs, dense_costs) <= budget
    assert all(k is None or (k % multiple == 0 and (c is None or k <= c)) for k, c in zip(ranks, caps))
    err = sum(0.0 if k is None else float((s[k:] ** 2).sum()) for s, k in zip(spectra, ranks))
    assert err <= _brute_force(spectra, costs, dense_costs, budget, multiple, caps) * 1.5 + 1e-9


def test_a_capped_layer_goes_dense_when_that_leaves_less_error_for_the_budget():
    flat = torch.ones(20)  # every component matters as much: a rank stopped at 2 leaves most of the error
    steep = torch.tensor([10.0] + [1e-3] * 19)
    ranks = allocate_ranks([flat, steep], [40, 40], [400, 400], 450, max_ranks=[2, None])
    assert ranks == [None, 1]  # dense (400) + rank 1 (40) fits, and beats rank 2 + whatever the rest buys
    # a capped layer whose rest of the spectrum is negligible stays at its cap: dense would buy nothing
    assert allocate_ranks([flat, steep], [40, 40], [400, 400], 450, max_ranks=[None, 1])[1] == 1


def test_round_rank():
    assert round_rank(37, 8, 64) == 32 and round_rank(5, 8, 64) == 8 and round_rank(100, 8, 60) == 56
    assert round_rank(5, 16, 12) is None  # no multiple fits the full rank
    for bad in (0, -8, 2.5, True):
        with pytest.raises(ValueError, match="rank multiple: expected an int >= 1"):
            round_rank(5, bad, 64)
    with pytest.raises(ValueError, match="rank multiple"):
        allocate_ranks([torch.ones(4)], [8], [16], 100, multiple=0)


@pytest.mark.parametrize("bad", [0, -4, 2.0, True, "8"])
def test_a_rank_multiple_below_one_is_refused(bad):
    with pytest.raises(ValueError, match=r"rank_multiple: expected an int >= 1 .* got"):
        CompressConfig(rank_multiple=bad)
    with pytest.raises(ValueError, match="speed_aware: expected one of 'auto', 'on', 'off'"):
        CompressConfig(speed_aware="fast")


def test_per_layer_specs_round_to_the_multiple():
    model = mlp(width=64)  # 24 -> 64 -> 64 -> 16
    _, report = compress(model, CompressConfig(method="svd", rank=13, rank_multiple=8, speed_aware="off"))
    assert {row.name: row.rank for row in report.layers} == {"0": 8, "2": 8, "4": 8}  # 13 rounds down to 8
    # Energy and ErrorTol round up: they keep their promise
    for spec in (Energy(0.6), ErrorTol(0.5)):
        plain = {r.name: r.rank for r in compress(model, CompressConfig(method="svd", rank=spec, speed_aware="off"))[1].layers}
        rounded = {r.name: r.rank for r in compress(model, CompressConfig(method="svd", rank=spec, rank_multiple=4, speed_aware="off"))[1].layers}
        for name, k in rounded.items():
            if k is not None and plain[name] is not None:
                assert k % 4 == 0 and plain[name] <= k < plain[name] + 4


def test_the_budget_holds_with_multiples_and_caps_and_the_report_says_why():
    model = mlp(width=96)  # 24 -> 96 (break-even 19.2), 96 -> 96 (48), 96 -> 16 (13.7)
    caps = FixedCaps({(96, 24): 0, (96, 96): 20, (16, 96): 13})
    with using_costs(caps):
        _, report = compress(model, CompressConfig(method="svd", budget=0.6, rank_multiple=4, speed_aware="on"))
    rows = {row.name: row for row in report.layers}
    assert sorted(set(caps.asked)) == sorted(caps.caps)
    assert report.totals()["target_kept_fraction"] <= 0.6 + 1e-9
    assert rows["0"].rank is None and rows["0"].speed_cap == 0
    assert "kept dense for speed: no rank (multiple of 4) runs faster than the dense layer (fixed caps of the test)" in rows["0"].skip_reason
    for name in ("2", "4"):
        row = rows[name]
        assert row.speed_cap == caps.caps[row.shape]
        assert row.rank is None or (row.rank % 4 == 0 and row.rank <= row.speed_cap)
    assert report.totals()["speed_capped_layers"] == 3
    # without the speed caps, layer 2 takes more than its cap from the same budget
    _, free = compress(model, CompressConfig(method="svd", budget=0.6, rank_multiple=4, speed_aware="off"))
    assert {row.name: row.rank for row in free.layers}["2"] > 20
    assert all(row.speed_cap is None for row in free.layers)


def test_speed_aware_auto_caps_only_causal_lms_with_a_budget():
    from svdkit.compression.rank_rules import speed_aware

    model = mlp()
    assert not speed_aware(CompressConfig(budget=0.5), model)
    assert speed_aware(CompressConfig(budget=0.5, speed_aware="on"), model)
    assert not speed_aware(CompressConfig(speed_aware="off", budget=0.5), model)
