"""Ranks: per-layer specs, rank_pattern, break-even, the global budget and its allocator."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from svdkit.compression import CompressConfig, compress
from svdkit.linalg import Energy, allocate_ranks

from compression_helpers import correlated_batches, mlp


def test_energy_spec_and_rank_pattern():
    model = mlp()
    _, report = compress(model, CompressConfig(method="svd", rank=Energy(0.5), rank_pattern={"2": 7}))
    ranks = {row.name: row.rank for row in report.layers}
    assert ranks["2"] == 7
    S = torch.linalg.svdvals(model[0].weight.double())
    expected = int(torch.searchsorted((S.square().cumsum(0) / S.square().sum()), torch.tensor(0.5, dtype=torch.float64))) + 1
    assert ranks["0"] == expected


def test_layers_at_or_above_break_even_stay_dense_with_a_reason():
    model = mlp()
    _, report = compress(model, CompressConfig(method="svd", rank=40))
    row = report.layers[1]  # 48x48: break-even 24
    assert row.rank is None and "break-even" in row.skip_reason and row.params_after == row.params_before


def brute_force(spectra, costs, dense_costs, budget):
    best_err = float("inf")
    for ks in itertools.product(*[range(1, len(s) + 1) for s in spectra]):
        spent = sum(min(k * c, d) for k, c, d in zip(ks, costs, dense_costs))
        if spent > budget:
            continue
        err = sum(float((s[k:] ** 2).sum()) if k * c < d else 0.0 for s, k, c, d in zip(spectra, ks, costs, dense_costs))
        best_err = min(best_err, err)
    return best_err


@pytest.mark.parametrize("seed", range(6))
def test_allocate_ranks_respects_the_budget_and_is_near_optimal(seed):
    g = np.random.default_rng(seed)
    spectra = [np.sort(g.gamma(1.0, size=5) * g.uniform(0.5, 3))[::-1] for _ in range(3)]
    costs, dense_costs = [10, 10, 10], [40, 40, 40]
    budget = int(g.integers(40, 100))
    ranks = allocate_ranks([torch.tensor(s.copy()) for s in spectra], costs, dense_costs, budget)
    spent = sum(dense_costs[i] if k is None else k * costs[i] for i, k in enumerate(ranks))
    assert spent <= budget
    err = sum(0.0 if k is None else float((s[k:] ** 2).sum()) for s, k in zip(spectra, ranks))
    assert err <= brute_force(spectra, costs, dense_costs, budget) * 1.5 + 1e-9


def test_allocate_ranks_errors():
    with pytest.raises(ValueError, match="cannot keep rank 1"):
        allocate_ranks([torch.ones(3)], [10], [20], 5)
    with pytest.raises(ValueError, match="spectra"):
        allocate_ranks([torch.ones(3)], [10, 2], [20], 50)


def test_global_budget_is_respected_and_shares_ranks_unevenly():
    model = mlp()
    batches = correlated_batches()
    _, report = compress(model, CompressConfig(method="fisher", budget=0.5), batches)
    # within the budget, and short of it by less than one more rank of the costliest layer
    step = max((row.shape[0] + row.shape[1]) * row.groups for row in report.layers) / report.target_params_before
    assert 0.5 - step <= report.kept_fraction <= 0.5 + 1e-9
    assert len({row.rank for row in report.layers}) > 1


def test_budget_over_the_whole_model():
    model = mlp()
    batches = correlated_batches()
    out, report = compress(model, CompressConfig(method="fisher", budget=0.6, budget_scope="model"), batches)
    assert sum(p.numel() for p in out.parameters()) <= 0.6 * sum(p.numel() for p in model.parameters()) + 1

