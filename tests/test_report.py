"""Tables, figures and the HTML report of analyses."""

import base64
import io

import pytest
import torch
from torch import nn

from svdkit.analysis.activations import analyze_activations
from svdkit.analysis.weights import analyze_weights
from svdkit.report.html import render_html, write_html
from svdkit.report.tables import common_prefix, format_value, print_table

pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_plain_table_lists_layers_summary_rule_and_skips(tables):
    weights, acts = tables
    text = weights.to_table()
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["name", "kind", "out"]
    assert len(lines) == 2 + len(weights) + 2  # header, rule, one line per record, means, verdict rule
    assert "0 [slices]" in text and lines[-2].startswith("mean: ") and lines[-1].startswith("verdict: factorize at")
    assert str(weights) == text
    assert "RankMe" in acts.to_table() and acts.to_table(["name", "dim"]).splitlines()[0].split() == ["name", "dim"]


def test_every_table_object_speaks_the_same_four_names(tables, tmp_path):
    import json

    from svdkit.analysis import TrackerHistory, TrajectoryAnalysis

    weights, acts = tables
    history = TrackerHistory(["a", "b"], ["sigma_max"])
    history.write(0, ["a", "b"], ["sigma_max"], [[1.0], [2.0]])
    history.write(1, ["a", "b"], ["sigma_max"], [[1.5], [float("nan")]])
    recorder = __import__("svdkit.analysis", fromlist=["TrajectoryRecorder"]).TrajectoryRecorder([nn.Parameter(torch.zeros(6))])
    for step in range(4):
        recorder.params[0].data.add_(torch.randn(6))
        recorder.snapshot(step)
    trajectory = recorder.analyze()
    assert isinstance(trajectory, TrajectoryAnalysis)
    for obj in (weights, acts, history, trajectory):
        assert isinstance(obj.to_table(), str) and obj.to_table()
        data = obj.to_dict()
        assert json.loads(obj.to_json()) == json.loads(json.dumps(data))  # JSON-ready, NaN as null
        path = tmp_path / f"{type(obj).__name__}.json"
        obj.to_json(path)
        assert json.loads(path.read_text()) == json.loads(obj.to_json())
    pd = pytest.importorskip("pandas")
    assert len(history.to_pandas()) == 4 and list(history.to_pandas().columns) == ["step", "layer", "sigma_max"]
    assert len(trajectory.to_pandas()) == len(trajectory.singular_values)
    assert isinstance(weights.to_pandas(), pd.DataFrame)


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

    judged = analyze_weights(nn.Sequential(nn.Linear(6, 12)), calibration=[torch.randn(32, 6)])
    rich_text = io.StringIO()
    print_table(judged, file=rich_text)
    assert "E[x x^T]" in rich_text.getvalue()  # text, not swallowed as rich markup
    monkeypatch.setattr(builtins, "__import__", no_rich)
    plain = io.StringIO()
    print_table(weights, file=plain)
    assert plain.getvalue() == weights.to_table() + "\n"


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
