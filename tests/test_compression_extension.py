"""The extension points, end to end: a compression method, a curvature estimate and a layer kind,
each registered from a test, run through both pipelines (and LoRA and the analysis for the kind).

Each registration is removed in its fixture's teardown, which also checks that the registry is
exactly as it was before (so no test depends on the order tests run in).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from svdkit.analysis import analyze_weights
from svdkit.compression import CURVATURES, METHODS, CompressConfig, compress, register_curvature, register_method
from svdkit.compression.methods import Transform
from svdkit.layers.lora import LoRALinear, lora_kinds, register_lora_wrapper
from svdkit.layers.lowrank import LowRankLinear, register_low_rank
from svdkit.lora import add_lora
from svdkit.views import WeightView, get_view, kinds, register_view, unregister_view, weight_matrix

SEEN: dict[str, list] = {}


@pytest.fixture
def output_whitening():
    """A toy method that needs output gradients: ``M = C^T W`` with ``C C^T = E[g g^T]`` (no input
    whitening), and a toy curvature whose objective is the sum of the model's output."""
    before = (dict(METHODS), dict(CURVATURES))
    SEEN.clear()

    @register_method("test_output_whitening", needs=("gradients",), options=("output_damping",))
    def output_whitening(W, stats, *, output_damping):
        SEEN.setdefault("gradients", []).append(stats.gradients)
        C, _ = stats.output_whitening(output_damping)
        C = C.to(W.device, torch.float64)
        return Transform(C.T @ W.to(torch.float64), undo_left=lambda X: torch.linalg.solve_triangular(C.T, X, upper=True),
                         method="test_output_whitening")

    @register_curvature("test_output_sum")
    def output_sum(result, batch, probes, generator):
        from svdkit.batches import output_tensor

        yield output_tensor(result).sum()

    yield
    del METHODS["test_output_whitening"], CURVATURES["test_output_sum"]
    assert (dict(METHODS), dict(CURVATURES)) == before


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(12, 24), nn.Linear(24, 24), nn.Linear(24, 6)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def test_a_method_that_needs_gradients_runs_through_the_whole_model_pipeline(output_whitening):
    model = MLP().double()
    batches = [torch.randn(16, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    config = CompressConfig(method="test_output_whitening", curvature="test_output_sum", rank=3, pipeline="model")
    out, report = compress(model, config, batches)
    assert {row.method for row in report.layers} == {"test_output_whitening"}
    assert all(row.rank == 3 for row in report.layers)
    # The objective is sum(output): the gradient at c's output is a vector of ones for every row,
    # so the recorded Gram is count * 1 1^T, known without svdkit.
    grams = {g.gram.shape[0]: g for g in SEEN["gradients"]}
    last = grams[6]
    assert last.count == 48
    torch.testing.assert_close(last.gram, torch.full((6, 6), 48.0, dtype=torch.float64), rtol=0, atol=0)
    # The factors are the metric's truncation, mapped back: W' = C^-T trunc_3(C^T W).
    C, _ = _cholesky(last.gram / last.count, config.output_damping)
    W = model.c.weight.detach()
    U, S, Vh = torch.linalg.svd(C.T @ W)
    expected = torch.linalg.solve_triangular(C.T, U[:, :3] * S[:3] @ Vh[:3], upper=True)
    torch.testing.assert_close(out.c.dense_weight(), expected, rtol=1e-9, atol=1e-10)


def _cholesky(gram, damping):
    from svdkit.linalg import cholesky_factor

    return cholesky_factor(gram, damping=damping)


def test_a_method_that_needs_gradients_runs_through_the_block_pipeline(output_whitening, make_decoder):
    model = make_decoder("llama", causal=True, layers=2)
    ids = [torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    config = CompressConfig(method="test_output_whitening", curvature="test_output_sum", budget=0.6)
    out, report = compress(model, config, ids)
    assert report.pipeline == "blocks"
    assert {row.method for row in report.layers} == {"test_output_whitening"}
    # every target's transform saw output-gradient statistics from every token of pass 1
    assert len(SEEN["gradients"]) >= len(report.layers) and all(g is not None and g.count == 72 for g in SEEN["gradients"])
    assert 0.5 < report.kept_fraction <= 0.6 + 1e-9
    with torch.no_grad():
        assert torch.isfinite(out(ids[0]).logits).all()


def test_a_method_that_needs_no_data_and_one_that_does_are_told_apart_by_their_record(output_whitening):
    assert not CompressConfig(method="svd").needs_data
    assert CompressConfig(method="test_output_whitening").needs_data
    with pytest.raises(ValueError, match="refit: .*use a method among"):
        CompressConfig(method="test_output_whitening", refit=1)
    with pytest.raises(ValueError, match="needs calibration data"):
        compress(MLP(), CompressConfig(method="test_output_whitening", rank=2))


class TransposedLinear(nn.Module):
    """A layer svdkit has never heard of: weight stored (in, out), ``y = x W + b``."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out) / d_in ** 0.5)
        self.bias = nn.Parameter(torch.randn(d_out) * 0.1)

    def forward(self, x):
        return x @ self.weight + self.bias


class LowRankTransposed(LowRankLinear):
    """Its factorized form: LowRankLinear's factors; back to a TransposedLinear."""

    def to_dense(self) -> nn.Module:
        dense = TransposedLinear(self.in_features, self.out_features)
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight().T)
            dense.bias.copy_(self.bias)
        return dense


class LoRATransposed(LoRALinear):
    """Its LoRA wrapper: LoRALinear's adapters on the (out, in) matrix."""


@pytest.fixture
def transposed_kind():
    before = kinds()
    view = register_view(lambda m: isinstance(m, TransposedLinear),
                         WeightView("transposed", lambda m: m.weight.T, lambda m, W: m.weight.data.copy_(W.T)))
    register_low_rank("transposed")(LowRankTransposed)
    register_lora_wrapper("transposed")(LoRATransposed)
    yield view
    unregister_view("transposed")
    assert kinds() == before and "transposed" not in lora_kinds()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.first, self.second = TransposedLinear(10, 20), nn.Linear(20, 4)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def test_a_registered_layer_kind_is_compressed_lora_wrapped_and_analysed(transposed_kind):
    net = Net()
    x = torch.randn(64, 10, generator=torch.Generator().manual_seed(2))
    assert get_view(net.first) is transposed_kind
    # compressed: whitened by its own input rows, factorized, replaced; the rank-r error is the
    # whitened truncation of its (out, in) matrix
    out, report = compress(net, CompressConfig(method="whiten", rank=4), [x[:32], x[32:]])
    rows = {row.name: row for row in report.layers}
    assert rows["first"].kind == "transposed" and rows["first"].rank == 4 and isinstance(out.first, LowRankTransposed)
    W = weight_matrix(net.first).detach().double()
    L = torch.linalg.cholesky(x.double().T @ x.double() / 64 + 1e-6 * torch.eye(10, dtype=torch.float64) * (x.double().square().mean()))
    U, S, Vh = torch.linalg.svd(W @ L)
    torch.testing.assert_close(out.first.dense_weight().double(), (U[:, :4] * S[:4] @ Vh[:4]) @ torch.linalg.inv(L), rtol=1e-4, atol=1e-5)
    assert isinstance(out.first.to_dense(), TransposedLinear)
    # LoRA-wrapped: its wrapper, outputs unchanged at PiSSA init
    lora = add_lora(net, ["first"], r=3, init_lora_weights="pissa")
    assert isinstance(lora.first, LoRATransposed)
    torch.testing.assert_close(lora(x), net(x), rtol=1e-5, atol=1e-5)
    # analysed: one row of its kind, with the spectrum of its (out, in) matrix
    table = analyze_weights(net, error=None)
    record = {r["name"]: r for r in table.records}["first"]
    assert record["kind"] == "transposed" and (record["rows"], record["cols"]) == (20, 10)
    assert record["sigma_max"] == pytest.approx(float(torch.linalg.svdvals(W)[0]), rel=1e-5)
