"""The calibrated verdict of analyze_weights judges the spectrum compression's own method computes."""

import numpy as np
import pytest
import torch
from torch import nn

from svdkit.analysis.metrics import verdict_columns
from svdkit.analysis.weights import analyze_weights
from svdkit.analysis.whitened import whitened_spectra
from svdkit.calibrate import collect_input_stats
from svdkit.compression import CompressConfig, LayerStats
from svdkit.compression.compressor import LayerCompressor
from svdkit.surgery import find_targets

pytestmark = pytest.mark.usefixtures("one_thread")


class ConvNet(nn.Module):
    """A Conv2d, a grouped Conv2d (two groups) and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.grouped(torch.relu(self.conv(x))))
        return self.head(h.mean(dim=(2, 3)))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 6))


def _batches(shape, count=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(shape[-1], shape[-1], generator=g) if len(shape) == 2 else None
    out = []
    for _ in range(count):
        x = torch.randn(*shape, generator=g)
        out.append(x @ mix if mix is not None else x)  # correlated features: whitening matters
    return out


def _stats(model, batches):
    targets = find_targets(model, include_head=True)
    return targets, collect_input_stats(model, targets, batches)


@pytest.mark.parametrize("method", ["whiten", "asvd"])
def test_the_verdict_spectrum_is_the_compressors_exactly(method):
    for model, batches in ((_mlp(), _batches((32, 12))), (ConvNet(), _batches((6, 3, 8, 8)))):
        targets, stats = _stats(model, batches)
        compressor = LayerCompressor(CompressConfig(method=method), model)
        for name, module in targets:
            values, _ = whitened_spectra(module, stats[name], method)
            expected = compressor.spectrum(name, module, LayerStats(stats[name]))
            assert len(values) == expected.groups == getattr(module, "groups", 1)
            for ours, theirs in zip(values, expected.values):
                assert torch.equal(ours, theirs), name  # the same transform and SVD: bit for bit
            assert torch.equal(values[0], expected.values[0])


def test_whitened_values_are_the_singular_values_of_w_times_the_cholesky_factor():
    """An independent check in NumPy: s(W L), L L^T = E[x x^T] + 1e-6 mean(diag) I (compression's damping)."""
    model = _mlp()
    targets, stats = _stats(model, _batches((32, 12)))
    for name, module in targets:
        gram = (stats[name].gram / stats[name].count).numpy()
        L = np.linalg.cholesky(gram + 1e-6 * np.mean(np.diag(gram)) * np.eye(gram.shape[0]))
        reference = np.linalg.svd(module.weight.detach().double().numpy() @ L, compute_uv=False)
        (values,), notes = whitened_spectra(module, stats[name])
        assert not notes
        np.testing.assert_allclose(values.numpy(), reference, rtol=1e-9, atol=1e-7 * reference[0])


def test_the_table_columns_apply_the_rule_to_the_compressors_spectrum():
    model = ConvNet()
    batches = _batches((6, 3, 8, 8))
    table = analyze_weights(model, calibration=batches, error=0.2)
    targets, stats = _stats(model, batches)
    compressor = LayerCompressor(CompressConfig(method="whiten"), model)
    assert table.meta["whitened"]["method"] == "whiten" and table.meta["whitened"]["damping"] == CompressConfig().damping
    assert table.meta["whitened"]["layers"] == 3
    for name, module in targets:
        spectrum = compressor.spectrum(name, module, LayerStats(stats[name]))
        # a grouped convolution: the groups' pooled spectrum, judged with the per-group shape
        expected = verdict_columns(spectrum.spectrum().numpy(), spectrum.shape, 0.2, prefix="whitened_")
        assert {key: table[name][key] for key in expected} == expected, name
        if name == "grouped":
            assert spectrum.groups == 2 and spectrum.shape == (4, 72 // 2)


def test_a_method_that_needs_gradients_is_refused_before_any_work(monkeypatch):
    import svdkit.analysis.weights as weights

    monkeypatch.setattr(weights, "iter_eigenvalues", lambda *a, **k: pytest.fail("the analysis ran"))
    with pytest.raises(ValueError, match="verdict_method='fisher' needs gradients.*choose a method that needs only the layer inputs: asvd, svd, whiten"):
        analyze_weights(_mlp(), calibration=_batches((32, 12)), verdict_method="fisher")
    with pytest.raises(ValueError, match="verdict_method='whitening' is not a compression method"):
        analyze_weights(_mlp(), calibration=_batches((32, 12)), verdict_method="whitening")
