"""Streamed covariance, CKA and analyze_activations against direct computations on stored activations."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from svdkit.analysis.activations import analyze_activations, compare_activations, select_modules
from svdkit.analysis.covariance import CovarianceAccumulator, linear_cka

pytestmark = pytest.mark.usefixtures("one_thread")


def test_accumulator_matches_numpy_despite_a_large_mean():
    rng = np.random.default_rng(0)
    # |mean| >> sigma: the naive X^T X - n mu mu^T would cancel catastrophically.
    X = (rng.standard_normal((900, 12)) * 0.01 + 1e4).astype(np.float32).astype(np.float64)
    acc = CovarianceAccumulator(12)
    for chunk in np.array_split(X, 7):
        acc.update(torch.from_numpy(chunk).float())
    np.testing.assert_allclose(acc.covariance().numpy(), np.cov(X, rowvar=False), rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose(acc.mean.numpy(), X.mean(axis=0), rtol=1e-14)
    assert acc.n == 900


def test_accumulators_merge_like_one_pass():
    rng = np.random.default_rng(1)
    X = torch.from_numpy(rng.standard_normal((500, 6)) + 3)
    a, b, whole = CovarianceAccumulator(6), CovarianceAccumulator(6), CovarianceAccumulator(6)
    a.update(X[:123])
    b.update(X[123:])
    whole.update(X)
    a.merge(b)
    torch.testing.assert_close(a.M2, whole.M2, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(a.second_moment(), X.T @ X, rtol=1e-12, atol=1e-9)
    with pytest.raises(ValueError, match="merge"):
        a.merge(CovarianceAccumulator(5))
    with pytest.raises(ValueError, match="shape"):
        a.update(torch.zeros(3, 5))


def test_linear_cka_invariances_and_formula():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((300, 10))
    Q, _ = np.linalg.qr(rng.standard_normal((10, 10)))
    assert linear_cka(X, 3.0 * X @ Q + 5) == pytest.approx(1.0, abs=1e-12)
    Y = rng.standard_normal((300, 7))
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    direct = np.linalg.norm(Yc.T @ Xc) ** 2 / (np.linalg.norm(Xc.T @ Xc) * np.linalg.norm(Yc.T @ Yc))
    assert linear_cka(X, Y) == pytest.approx(direct, rel=1e-12)
    assert linear_cka(X, Y) < 0.1
    with pytest.raises(ValueError, match="same"):
        linear_cka(X, Y[:10])


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 4))


def _stored(model, names, batches):
    store = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: store[n].append(o.detach())) for n in names]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in handles:
        h.remove()
    return {n: torch.cat(v).double().numpy() for n, v in store.items()}


def test_metrics_match_stored_activations():
    model = _net()
    batches = [torch.randn(50, 8) for _ in range(6)]
    names = ["1", "3"]
    table = analyze_activations(model, batches, names)
    stored = _stored(model, names, batches)
    for record in table:
        X = stored[record["name"]]
        lam = np.sort(np.linalg.eigvalsh(np.cov(X, rowvar=False)))[::-1]
        ratio = lam / lam.sum()
        assert record["samples"] == 300 and record["dim"] == X.shape[1]
        np.testing.assert_allclose(record["explained_variance_ratio"], ratio[:10], rtol=1e-8, atol=1e-15)
        entropy_rank = math.exp(-np.sum(ratio[ratio > 0] * np.log(ratio[ratio > 0])))
        assert record["effective_rank"] == pytest.approx(entropy_rank, rel=1e-8)
        s = np.linalg.svd(X, compute_uv=False)
        p = s / s.sum() + 1e-7
        assert record["rankme"] == pytest.approx(math.exp(-np.sum(p * np.log(p))), rel=1e-6)
        cum = np.cumsum(ratio)
        assert record["cum_var_10"] == pytest.approx(cum[9], rel=1e-9)
        assert record["cum_var_100"] == pytest.approx(1.0)
        assert record["dims_90"] == int(np.argmax(cum >= 0.9)) + 1
        np.testing.assert_allclose(record["top_singular_values"], np.sqrt(lam[:10]), rtol=1e-7)


def test_cka_between_layers_matches_stored_activations():
    model = _net()
    batches = [torch.randn(40, 8) for _ in range(5)]
    names = ["1", "3", "4"]
    table = analyze_activations(model, batches, names, cka=True)
    stored = _stored(model, names, batches)
    matrix = np.array(table.meta["cka"]["matrix"])
    assert table.meta["cka"]["layers"] == names
    np.testing.assert_allclose(np.diag(matrix), 1.0, rtol=1e-12)
    np.testing.assert_allclose(matrix, matrix.T, rtol=1e-12)
    assert matrix[0, 2] == pytest.approx(linear_cka(stored["1"], stored["4"]), rel=1e-9)
    # The per-layer numbers do not change when CKA is on.
    plain = analyze_activations(model, batches, names)
    assert table.column("effective_rank") == pytest.approx(plain.column("effective_rank"), rel=1e-9)


class _TinyEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 12)
        self.layers = nn.ModuleList([nn.Linear(12, 12) for _ in range(3)])

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return (h,)


def test_sequences_skip_padding_and_pool():
    torch.manual_seed(1)
    model = _TinyEncoder()
    ids = torch.randint(1, 50, (4, 9))
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[1, 5:] = 0
    mask[3, 2:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    assert [n for n, _ in select_modules(model)] == ["layers.0", "layers.1", "layers.2"]
    tokens = analyze_activations(model, [batch])
    assert tokens.column("samples") == [int(mask.sum())] * 3
    with torch.no_grad():
        h = torch.tanh(model.layers[1](torch.tanh(model.layers[0](model.emb(ids)))))
        h = model.layers[2](h)  # the hooked output: before the last tanh
    X = h[mask.bool()].double().numpy()
    assert tokens["layers.2"]["total_variance"] == pytest.approx(np.trace(np.cov(X, rowvar=False)), rel=1e-9)
    pooled = analyze_activations(model, [batch], samples="pooled")
    assert pooled.column("samples") == [4, 4, 4]
    means = ((h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)).double().numpy()
    assert pooled["layers.2"]["total_variance"] == pytest.approx(np.trace(np.cov(means, rowvar=False)), rel=1e-9)


def test_feature_maps_positions_or_pooled():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU())
    x = torch.randn(4, 3, 8, 8)
    positions = analyze_activations(model, [x], ["0"])
    assert positions[0]["samples"] == 4 * 6 * 6 and positions[0]["dim"] == 5
    assert analyze_activations(model, [x], ["0"], samples="pooled")[0]["samples"] == 4


def test_hooks_are_removed_even_on_error():
    model = _net()
    model.train()
    with pytest.raises(ValueError, match=r"^batch 1 in layer 0 \(Linear\): RuntimeError: mat1 and mat2"):
        analyze_activations(model, [torch.randn(5, 8), torch.randn(5, 3)], ["1"])  # batch 1 has the wrong width
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert model.training
    with pytest.raises(ValueError, match="no batches"):
        analyze_activations(model, [], ["1"])
    with pytest.raises(ValueError, match="no module matches"):
        analyze_activations(model, [torch.randn(5, 8)], ["nope"])
    with pytest.raises(ValueError, match="samples"):
        analyze_activations(model, [torch.randn(5, 8)], ["1"], samples="mean")


def test_compare_two_models():
    model = _net()
    batches = [torch.randn(60, 8) for _ in range(3)]
    same = compare_activations(model, model, batches, ["1", "3"])
    assert same.column("cka") == pytest.approx([1.0, 1.0], abs=1e-9)
    other = _net()
    with torch.no_grad():
        other[2].weight.add_(0.5 * torch.randn_like(other[2].weight))
    changed = compare_activations(model, other, batches, ["1", "3"])
    assert changed["1"]["cka"] == pytest.approx(1.0, abs=1e-9)
    assert changed["3"]["cka"] < 0.99


def test_bad_data_gives_errors_that_name_the_batch_and_the_layer():
    model = _net()
    with pytest.raises(ValueError, match="data is None: pass a list of strings"):
        analyze_activations(model, None)
    with pytest.raises(TypeError, match="not a single str"):
        analyze_activations(model, "some text")
    with pytest.raises(TypeError, match="need a model loaded with svdkit.models.load_model"):
        analyze_activations(model, ["a sentence"])
    poisoned = [torch.randn(6, 8), torch.randn(6, 8)]
    poisoned[1][2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"batch 1: the output of layer 0 \(Linear\) holds 32 NaN or infinite values of 192"):
        analyze_activations(model, poisoned, ["0", "2"])
    with pytest.raises(ValueError, match=r"batch \(second model\) 0 in layer 0"):
        compare_activations(model, nn.Sequential(nn.Linear(5, 32)), [torch.randn(4, 8)], ["0"])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
