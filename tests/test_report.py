"""Tables, figures and the HTML report of analyses."""

import base64
import io

import pytest
import torch
from torch import nn

from svdkit.analysis.activations import analyze_activations
from svdkit.analysis.weights import analyze_weights
from svdkit.report.html import render_html, write_html
from svdkit.report.tables import common_prefix, format_table, format_value, print_table


@pytest.fixture(scope="module")
def tables():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 32), nn.Tanh(), nn.Linear(32, 10))
    weights = analyze_weights(model, conv2d="both")
    acts = analyze_activations(model, [torch.randn(64, 3, 8, 8)], ["1", "4", "5"], samples="pooled", cka=True)
    return weights, acts


def test_format_value_and_prefix():
    assert format_value(float("nan")) == "-" and format_value(None) == "-"
    assert format_value(3) == "3" and format_value(0.123456) == "0.1235" and format_value(1.5e7) == "1.5e+07"
    assert format_value([384, 1536]) == "384x1536"
    assert common_prefix(["0.model.encoder.layer.0", "0.model.encoder.layer.1"]) == "0.model.encoder."
    assert common_prefix(["a.b", "a.c"]) == "a."
    assert common_prefix(["a", "a.b"]) == ""


def test_plain_table_lists_layers_summary_and_skips(tables):
    weights, acts = tables
    text = format_table(weights)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["name", "kind", "out"]
    assert "0 [slices]" in text and "mean:" in text
    assert "RankMe" in format_table(acts)


def test_print_table_with_rich_or_plain(tables, monkeypatch):
    weights, _ = tables
    buffer = io.StringIO()
    print_table(weights, title="weights", file=buffer)
    assert "stable rank" in buffer.getvalue() and "weights" in buffer.getvalue()
    import builtins

    real_import = builtins.__import__

    def no_rich(name, *args, **kwargs):
        if name.startswith("rich"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_rich)
    plain = io.StringIO()
    print_table(weights, file=plain)
    assert plain.getvalue().startswith("name")


def test_figures_and_html(tables, tmp_path):
    pytest.importorskip("matplotlib")
    from svdkit.report.figures import save_figures

    weights, acts = tables
    written = save_figures(tmp_path / "png", weights, acts)
    assert {"metrics_by_depth", "energy_curves", "activation_spectra", "cka"} <= set(written)
    assert sum(k.startswith("esd_") for k in written) == len(weights)
    for path in written.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    page = render_html(weights, acts, {k: v.read_bytes() for k, v in written.items()}, subtitle="toy")
    assert page.count("data:image/png;base64,") == len(written)
    assert 'src="http' not in page and "<table>" in page
    first = page.split("data:image/png;base64,")[1].split('"')[0]
    assert base64.b64decode(first)[:4] == b"\x89PNG"
    path = write_html(tmp_path / "report.html", weights, None, max_esd=1)
    assert path.read_text().count("<img") == 1 + 2
