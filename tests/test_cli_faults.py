"""What a demanding user tries on ``svdkit compress/eval/analyze/lora`` and ``load_model``: paths
svdkit did not write, selections that match nothing, options a model would ignore, files that
are not what they should be. Each is the right result or one line that names the thing, given
before the long work."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from svdkit.cli import main
from svdkit.models import load_model

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--calib-seqs", "8", "--seq-len", "32", "--batch-size", "4", "--no-progress"]


@pytest.fixture
def factory(tmp_path, monkeypatch):
    """``faults_factory:build`` (a Linear 16 -> 32, ReLU, Linear 32 -> 8: layers "0" and "2"),
    ``faults_factory:broken`` (raises) and ``faults_factory:torch`` (a module, not a function);
    plus ``inputs.pt``, 64 inputs of 16 features."""
    (tmp_path / "faults_factory.py").write_text(
        "import torch\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))\n"
        "def broken():\n"
        "    raise RuntimeError('no weights here')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.save(torch.randn(64, 16, generator=torch.Generator().manual_seed(0)), tmp_path / "inputs.pt")
    yield "faults_factory"
    import sys

    sys.modules.pop("faults_factory", None)


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err


# --- outputs ----------------------------------------------------------------------------------------


def test_outputs_svdkit_did_not_write_are_refused_before_loading(lm_dir, tmp_path, capsys, monkeypatch):
    model_copy = tmp_path / "model"
    shutil.copytree(lm_dir, model_copy)
    monkeypatch.chdir(tmp_path)
    cases = [
        (["-o", ".", "--overwrite"], "cannot save into .: it is the current directory or one above it; name a new directory"),
        (["-o", str(model_copy), "--overwrite"], f"refusing to overwrite {model_copy}: it is not an svdkit compressed model directory"),
        (["-o", str(model_copy), "--overwrite", "--stream"], f"refusing to overwrite {model_copy}: it is not an svdkit compressed model"),
        (["-o", str(model_copy), "--stream"], f"{model_copy} exists; pass --overwrite to replace it"),
    ]
    for options, message in cases:
        assert main(["compress", str(lm_dir), *options, *SMALL]) == 1
        err = _err(capsys)
        assert message in err and "loading" not in err and "compressing" not in err, (options, err)
    assert sorted(p.name for p in model_copy.iterdir()) == sorted(p.name for p in lm_dir.iterdir())


def test_json_beside_the_table_and_never_the_output_directory(factory, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["compress", f"{factory}:build", "-o", str(out), "--calib", str(tmp_path / "inputs.pt"), "--rank", "4", "--no-progress"]
    assert main([*base, "--json", str(out)]) == 1
    assert f"{out} is named as an output directory and as a file to write; give the file another name" in _err(capsys)
    assert main([*base, "--json", "-"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # standard output holds the JSON alone; the table goes to standard error
    assert report["totals"]["compressed"] == 2 and "total (2/2 factorized)" in captured.err


# --- the layer selection -----------------------------------------------------------------------------


def test_targets_and_excludes_are_read_as_documented_and_checked(factory, tmp_path, capsys):
    from svdkit.surgery import find_targets

    base = ["compress", f"{factory}:build", "--calib", str(tmp_path / "inputs.pt"), "--rank", "4", "--no-progress"]
    # one --exclude argument with regex characters is a full-match regex, as --targets is
    assert main([*base, "-o", str(tmp_path / "a"), "--exclude", "[0]", "--json", str(tmp_path / "a.json")]) == 0
    assert [row["name"] for row in json.loads((tmp_path / "a.json").read_text())["layers"]] == ["2"]
    capsys.readouterr()
    cases = [
        (["--targets", "["], "--targets '[' is not a valid regular expression (unterminated character set at position 0); "
                             "pass names, or escape the special characters"),
        (["--exclude", ".*"], "no layer to compress: --targets (all) with --exclude .* select none of the model's 2 supported layers"),
        (["--exclude", "lin.*"], "--exclude 'lin.*' matches no module of the model (a regex must match the whole name, e.g. '.*lin.*')"),
        (["--exclude", "3"], "--exclude '3' matches no module of the model; layers look like: 0, 2"),
        (["--targets", "9"], "no layer to compress: --targets 9 with --exclude (none) select none of the model's 2 supported layers, e.g. 0, 2"),
    ]
    for options, message in cases:
        assert main([*base, "-o", str(tmp_path / "b"), *options]) == 1
        err = _err(capsys)
        assert message in err and "compressing" not in err, (options, err)
    assert not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match=r"exclude_modules: '\(' is not a valid regular expression"):
        find_targets(torch.nn.Sequential(torch.nn.Linear(2, 2)), exclude_modules="(")


def test_a_selection_of_nothing_is_refused_before_the_dense_quality_is_measured(lm_dir, tmp_path, capsys, monkeypatch):
    import svdkit.eval

    calls = []
    monkeypatch.setattr(svdkit.eval, "language_model_quality", lambda *a, **k: calls.append(1) or {})
    assert main(["compress", str(lm_dir), "-o", str(tmp_path / "o"), "--targets", "nomatch", *SMALL]) == 1
    assert "no layer to compress: --targets nomatch" in _err(capsys) and calls == []


# --- options the model, or the other options, make meaningless --------------------------------------


def test_options_that_would_be_ignored_are_refused(factory, lm_dir, tmp_path, capsys):
    inputs = str(tmp_path / "inputs.pt")
    cases = [  # (argv, message, whether the options alone say it: then nothing is loaded)
        (["compress", f"{factory}:build", "-o", str(tmp_path / "o"), "--calib", inputs, "--seq-len", "8"],
         f"--seq-len applies to causal language models (block by block); '{factory}:build' is a factory model, compressed whole: drop it",
         False),
        (["compress", str(lm_dir), "-o", str(tmp_path / "o"), "--device", "cpu", "--pipeline", "model", *SMALL],
         "--device moves each block of the block pipeline to the compute device; --pipeline model and --refit compress the whole "
         "model where it is loaded (the CPU): drop --device", False),
        (["compress", str(lm_dir), "-o", str(tmp_path / "o"), "--gradient-seqs", "100", *SMALL],
         "--gradient-seqs 100 is more than the 8 calibration windows (--calib-seqs): the curvature uses some of them", True),
        (["compress", str(tmp_path / "inputs.pt"), "-o", str(tmp_path / "o"), "--stream"],
         f"--stream reads a transformers checkpoint directory (config.json and safetensors) block by block; "
         f"{str(tmp_path / 'inputs.pt')!r} is not one: compress it without --stream", True),
        (["compress", str(lm_dir), "-o", str(tmp_path / "o"), "--method", "nope", *SMALL], "method: unknown method 'nope'", True),
        (["compress", str(lm_dir), "-o", str(tmp_path / "o"), "--method", "whiten", "--curvature", "sampled", *SMALL],
         "curvature: method 'whiten' measures no curvature (methods that do: fisher)", True),
        (["compress", str(lm_dir), "-o", str(tmp_path / "o"), "--curvature", "fishy", *SMALL],
         "curvature: expected one of 'auto', 'probes', 'labels', 'sampled', got 'fishy'", True),
    ]
    for argv, message, from_options in cases:
        assert main(argv) == 1
        err = _err(capsys)
        assert message in err, (argv, err)
        assert ("loading" not in err) or not from_options, (argv, err)
    assert not (tmp_path / "o").exists()


# --- eval ---------------------------------------------------------------------------------------------


def test_eval_data_is_checked_before_anything_is_loaded(lm_dir, capsys, monkeypatch):
    import svdkit.models
    from svdkit.tokens import evaluation_tokens

    monkeypatch.setattr(svdkit.models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    assert main(["eval", str(lm_dir), "--data", "in-domain", "missing.txt"]) == 1
    assert "--data 'missing.txt': no such file (use 'in-domain', 'other-domain', 'legal-english', 'math-docs', or .txt / .pt files)" in _err(capsys)
    # the calibration text is no measure of a model calibrated on it
    assert main(["eval", str(lm_dir), "--data", "builtin"]) == 1
    assert "--data 'builtin': no such file" in _err(capsys)
    with pytest.raises(ValueError, match="'builtin' is the calibration text: a model is measured on text it was not calibrated on, "
                                         "'in-domain' or 'other-domain'"):
        evaluation_tokens("builtin")


# --- analyze ------------------------------------------------------------------------------------------


def test_analyze_columns_and_data_are_named(factory, tmp_path, capsys):
    spec = f"{factory}:build"
    assert main(["analyze", spec, "--columns", "ranck", "--no-progress"]) == 1
    assert "--columns: the weight table has no column 'ranck'; it has: name, kind," in _err(capsys)
    assert main(["analyze", spec, "--columns", "rank", "--format", "table", "--output", str(tmp_path / "t.txt"), "--no-progress"]) == 0
    text = (tmp_path / "t.txt").read_text()  # a rich table, or plain text without rich
    for name, rank in (("0", 16), ("2", 8)):  # rows keep their names: layer 0 is 32x16, layer 2 is 8x32
        assert re.search(rf"(^|[^\w.]){name}[^\w.]+{rank}([^\w.]|$)", text, re.M), text
    assert main(["analyze", spec, "--activations", "--data", str(tmp_path / "missing.txt")]) == 1
    err = _err(capsys)
    assert err.strip().endswith(f"error: no data file at {str(tmp_path / 'missing.txt')!r} (use 'builtin' or a text file with one sentence per line)")


# --- lora ---------------------------------------------------------------------------------------------


def test_an_adapter_is_never_written_into_a_models_directory(lm_dir, tmp_path, capsys):
    from svdkit.lora import extract_lora
    from svdkit.lora.peft_io import export_peft

    tuned = tmp_path / "tuned"
    shutil.copytree(lm_dir, tuned)
    tensors = safetensors_torch.load_file(tuned / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"] += 0.1
    safetensors_torch.save_file(tensors, tuned / "model.safetensors", metadata={"format": "pt"})
    message = f"refusing to write the adapter into {str(tuned)!r}: it holds a model (config.json, model.safetensors), which would then load with the adapter applied"
    assert main(["lora", "extract", str(lm_dir), str(tuned), "-o", str(tuned), "--overwrite", "--rank", "2", "--no-progress"]) == 1
    err = _err(capsys)
    assert message in err and "extracting" not in err
    assert not (tuned / "adapter_config.json").exists()
    base, fine = load_model(str(lm_dir)).module, load_model(str(tuned)).module
    adapted, _ = extract_lora(base, fine, 2)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        export_peft(adapted, tuned)
    assert export_peft(adapted, tmp_path / "adapter") == tmp_path / "adapter"


# --- load_model -----------------------------------------------------------------------------------------


def test_load_model_names_what_it_cannot_load(factory, tmp_path):
    with pytest.raises(ValueError, match=r"the factory 'faults_factory:broken' failed: RuntimeError: no weights here"):
        load_model(f"{factory}:broken")
    with pytest.raises(ValueError, match=r"'faults_factory:torch' names a module, not a factory function that returns an nn.Module"):
        load_model(f"{factory}:torch")
    with pytest.raises(ValueError, match=r"the model spec is empty or not a string \(''\): expected 'minilm', 'smollm2'"):
        load_model("")
    weights = tmp_path / "weights.safetensors"
    safetensors_torch.save_file({"w": torch.zeros(2, 2)}, weights)
    with pytest.raises(ValueError, match=r"weights.safetensors' holds weights without their architecture: pass the directory with its config.json"):
        load_model(str(weights))
    assert load_model(f"{factory}:build").kind == "factory"


def test_a_sentence_transformers_directory_missing_a_weight_is_refused(tmp_path):
    st = pytest.importorskip("sentence_transformers")
    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:  # older sentence-transformers
        from sentence_transformers.models import Pooling, Transformer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz"]
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "vocab.txt").write_text("\n".join(words) + "\n")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(bert)
    transformers.BertTokenizerFast(vocab_file=str(bert / "vocab.txt")).save_pretrained(bert)
    folder = tmp_path / "sentence-model"
    st.SentenceTransformer(modules=[Transformer(str(bert), max_seq_length=32), Pooling(32)]).save(str(folder))
    assert load_model(str(folder)).is_sentence_model  # complete: loads
    tensors = safetensors_torch.load_file(folder / "model.safetensors")
    key = "encoder.layer.1.attention.self.query.weight"
    del tensors[key]
    safetensors_torch.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"sentence-model lacks 1 weight\(s\) that BertModel needs: {key}; transformers would initialize"):
        load_model(str(folder))
    assert load_model(str(folder), allow_missing=True).is_sentence_model


def test_a_compressed_directory_whose_source_is_gone_says_what_it_needs(factory, tmp_path):
    import sys

    out = tmp_path / "small"
    assert main(["compress", f"{factory}:build", "-o", str(out), "--calib", str(tmp_path / "inputs.pt"), "--rank", "4", "--no-progress"]) == 0
    assert load_model(str(out)).kind == "factory"  # rebuilt on the model it records
    (tmp_path / "faults_factory.py").unlink()
    sys.modules.pop("faults_factory", None)
    with pytest.raises(ValueError, match=rf"{out} holds only the factorized layers and is rebuilt on the model it was compressed from, "
                                         r"'faults_factory:build', which cannot be loaded \(cannot import the factory .*\); restore that "
                                         r"model, or load a copy of it yourself and call svdkit.load_compressed"):
        load_model(str(out))


def test_an_os_error_without_a_file_name_says_where_it_came_from(tmp_path, capsys, monkeypatch):
    """``[Errno 2] No such file or directory`` alone names nothing: the line says the working
    directory is gone when it is, and where the error was raised otherwise."""
    import svdkit.cli.info as info

    def lose(args):
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(info, "run", lose)  # main builds its parser per call: the patched run is registered
    assert main(["info"]) == 1
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"svdkit info: error: \[Errno 2\] No such file or directory \(raised in lose, test_cli_faults\.py line \d+\)", err), err

    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    assert main(["info"]) == 1
    err = capsys.readouterr().err
    assert "the current working directory was removed while svdkit ran" in err and "--resume" in err


def test_an_export_re_saved_without_svdkit_s_description_is_refused_without_running_its_code(tmp_path, monkeypatch):
    """A directory whose config.json svdkit wrote for plain transformers, but without
    svdkit_compressed.json (its base model re-saved alone): one line saying how to load it, and
    never transformers' interactive question about remote code."""
    from svdkit import CompressConfig, compress, save_compressed

    from export_families import build, token_batches

    small, _ = compress(build("llama"), CompressConfig(budget=0.6, speed_aware="off"), token_batches())
    save_compressed(small, tmp_path / "m")
    (tmp_path / "m" / "svdkit_compressed.json").unlink()
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("svdkit asked a question on stdin"))
    with pytest.raises(ValueError, match=r"exported for plain transformers but not svdkit's description.*runs no code from the directory"):
        load_model(str(tmp_path / "m"))
