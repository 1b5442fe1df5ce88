"""Compression methods: what each transform does to the weight and to the error it predicts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from svdkit.compression import CompressConfig, compress
from svdkit.linalg import cholesky_factor

from compression_helpers import DeadBranch, cnn, correlated_batches, mlp


def test_rank_r_weight_is_recovered_exactly():
    model = mlp()
    with torch.no_grad():
        W = torch.randn(48, 5) @ torch.randn(5, 48)
        model[2].weight.copy_(W)
    out, report = compress(model, CompressConfig(method="svd", rank=5, target_modules=["2"]))
    x = torch.randn(10, 24)
    torch.testing.assert_close(out(x), model(x), rtol=1e-4, atol=1e-5)
    assert report.layers[0].predicted_error == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("rank", [2, 6, 12])
def test_whiten_output_error_never_worse_than_svd_on_calibration_data(seed, rank):
    model = mlp(seed)
    batches = correlated_batches(seed + 10)
    X = torch.cat(batches)
    errors = {}
    for method in ("svd", "whiten"):
        out, _ = compress(model, CompressConfig(method=method, rank=rank, target_modules=["0"]), batches)
        errors[method] = (out[0](X) - model[0](X)).norm().item()
    assert errors["whiten"] <= errors["svd"] * (1 + 1e-6)


def test_whiten_predicted_error_is_the_calibration_output_error():
    model = mlp()
    batches = correlated_batches()
    X = torch.cat(batches)
    out, report = compress(model, CompressConfig(method="whiten", rank=6, target_modules=["0"], damping=1e-10), batches)
    W = model[0].weight.double()
    actual = ((out[0].dense_weight().double() - W) @ X.double().T).norm() / (W @ X.double().T).norm()
    assert report.layers[0].predicted_error == pytest.approx(actual.item(), rel=1e-3)


def test_asvd_scales_by_the_inputs_and_lowers_the_output_error_of_outlier_channels():
    """ASVD's effect, not its label: on inputs with a few large channels (as LLM activations have),
    scaling by mean|x|**asvd_alpha keeps what those channels need, so the layer's output error on the
    data is lower than plain SVD's at the same rank; with asvd_alpha=0 it is plain SVD exactly."""
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(32, 32))
    g = torch.Generator().manual_seed(3)
    scale = torch.ones(32)
    scale[:3] = 30.0
    batches = [torch.randn(64, 32, generator=g) * scale for _ in range(4)]
    X = torch.cat(batches)
    errors = {}
    for method, alpha in (("svd", 0.5), ("asvd", 0.5), ("asvd", 0.0)):
        out, report = compress(layer, CompressConfig(method=method, rank=6, asvd_alpha=alpha), batches)
        assert {row.method for row in report.layers} == {method}
        errors[method, alpha] = (out(X) - layer(X)).norm().item()
    assert errors["asvd", 0.5] < 0.8 * errors["svd", 0.5]
    assert errors["asvd", 0.0] == pytest.approx(errors["svd", 0.5], rel=1e-5)


def test_fisher_without_output_dependence_is_flagged():
    batches = correlated_batches()
    _, report = compress(DeadBranch(), CompressConfig(method="fisher", rank=5), batches)
    rows = {row.name: row for row in report.layers}
    assert rows["a"].method == rows["b"].method == "fisher" and not rows["a"].skip_reason
    assert rows["dead"].method == "whiten" and "does not depend on this layer" in rows["dead"].skip_reason
    # A budget spends nothing on it beyond the smallest rank: its errors cost the output nothing.
    _, report = compress(DeadBranch(), CompressConfig(method="fisher", budget=0.5, min_rank=1), batches)
    assert {row.name: row.rank for row in report.layers}["dead"] == 1


def test_fisher_lowers_the_model_output_error_against_whiten():
    model = mlp(3)
    batches = correlated_batches(4)
    X = torch.cat(batches)
    errors = {}
    for method in ("whiten", "fisher"):
        out, _ = compress(model, CompressConfig(method=method, rank=6, probes=8), batches)
        errors[method] = (out(X) - model(X)).norm().item()
    assert errors["fisher"] < errors["whiten"]


def test_cholesky_damping_escalates_on_a_singular_gram():
    G = torch.zeros(4, 4, dtype=torch.float64)
    G[0, 0] = 1.0
    L, used = cholesky_factor(G, damping=1e-12)
    assert used >= 1e-12
    torch.testing.assert_close(L @ L.T, G + used * 0.25 * torch.eye(4, dtype=torch.float64))


@pytest.mark.parametrize("damping", [0.0, 1e-6, 0.3, 2.0])
def test_cholesky_of_a_singular_gram_ends_with_the_damping_asked_for_or_the_next_that_works(damping):
    # damping 0 used to multiply 0 by 10 forever; a damping above the maximum used to be skipped
    # (the layer fell back to plain SVD without ever trying it)
    G = torch.zeros(6, 6, dtype=torch.float64)
    G[:2, :2] = torch.tensor([[2.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    L, used = cholesky_factor(G, damping=damping)
    assert used == damping if damping > 0 else 0 < used <= 1e-10
    scale = float(G.diagonal().mean())
    torch.testing.assert_close(L @ L.T, G + used * scale * torch.eye(6, dtype=torch.float64))


def test_cholesky_of_a_definite_gram_takes_no_damping_when_asked_for_none():
    A = torch.randn(20, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    L, used = cholesky_factor(A.T @ A, damping=0.0)
    assert used == 0.0
    torch.testing.assert_close(L, torch.linalg.cholesky(A.T @ A))


@pytest.mark.parametrize("damping", [-1e-3, float("nan"), float("inf")])
def test_cholesky_refuses_a_damping_that_is_not_a_finite_non_negative_number(damping):
    with pytest.raises(ValueError, match="damping"):
        cholesky_factor(torch.eye(3), damping=damping)


def test_an_output_damping_above_the_escalation_maximum_is_used_not_dropped():
    model = mlp()
    batches = correlated_batches(3)
    config = CompressConfig(method="fisher", curvature="probes", rank=4, target_modules=["0"], output_damping=0.5)
    _, report = compress(model, config, batches)
    assert report.layers[0].method == "fisher", report.layers[0].skip_reason


def test_whiten_falls_back_to_svd_when_a_layer_only_sees_zeros():
    model = mlp()
    batches = [torch.zeros(8, 24)]
    _, report = compress(model, CompressConfig(method="whiten", rank=3, target_modules=["0"]), batches)
    assert report.layers[0].method == "svd" and "whitening failed" in report.layers[0].skip_reason


def test_conv_whitening_uses_patches():
    model = cnn()
    batches = [torch.randn(8, 3, 12, 12) for _ in range(2)]
    _, report = compress(model, CompressConfig(method="whiten", rank=3, target_modules=["0"]), batches)
    assert report.layers[0].shape == (16, 27) and report.layers[0].method == "whiten"

