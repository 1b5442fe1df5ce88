"""``svdkit compress`` and ``svdkit eval`` on a causal LM directory (a small LLaMA with its own
tokenizer: the ``lm_dir`` fixture of conftest.py; random weights, structure only, never quality)."""

from __future__ import annotations

import json

import pytest
import torch

from svdkit.cli import main
from svdkit.models import load_model

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_causal_lm_directory_loads_with_its_head(lm_dir):
    loaded = load_model(str(lm_dir))
    assert loaded.is_causal_lm and loaded.vocab_size == 300
    assert type(loaded.module).__name__ == "LlamaForCausalLM"


def test_compress_then_eval_a_causal_lm(lm_dir, tmp_path, capsys):
    out = tmp_path / "small"
    code = main(["compress", str(lm_dir), "-o", str(out), "--params", "0.7", "--calib-seqs", "8", "--seq-len", "32",
                 "--batch-size", "4", "--json", str(tmp_path / "report.json"), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "blocks pipeline" in printed and "ppl in-domain (dense -> compressed)" in printed
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["totals"]["pipeline"] == "blocks"
    assert report["totals"]["target_kept_fraction"] <= 0.7 + 1e-9
    assert all(row["name"].startswith("model.layers.") for row in report["layers"])  # head and embedding stay dense
    # the saved directory generates on its own, as the compressed model did
    loaded = load_model(str(out))
    assert loaded.is_causal_lm and loaded.tokenizer is not None
    ids = loaded.tokenizer("The for statement", return_tensors="pt")["input_ids"]
    generated = loaded.module.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, ids.shape[1] + 5)
    card = (out / "README.md").read_text()  # the model card carries the quality measured
    assert "## Quality" in card and "| ppl in-domain (dense -> compressed) |" in card
    assert main(["eval", str(out), "--max-tokens", "256", "--seq-len", "64", "--json", str(tmp_path / "eval.json"), "--no-progress"]) == 0
    results = json.loads((tmp_path / "eval.json").read_text())
    assert set(results) == {"model", "source"}
    assert results["model"]["in-domain"] > 1 and results["source"]["other-domain"] > 1


@pytest.mark.parametrize("curvature", ["labels", "sampled"])
def test_the_curvature_option_reaches_the_saved_config(lm_dir, tmp_path, curvature):
    out = tmp_path / "small"
    assert main(["compress", str(lm_dir), "-o", str(out), "--params", "0.7", "--calib-seqs", "8", "--seq-len", "32",
                 "--batch-size", "4", "--curvature", curvature, "--no-eval", "--no-progress"]) == 0
    assert json.loads((out / "svdkit_compressed.json").read_text())["config"]["curvature"] == curvature


@pytest.mark.parametrize("options, epochs", [
    ([], 4),  # the default: block refinement of every block
    (["--refine-epochs", "0"], 0),
    (["--refine-epochs", "2"], 2),
    (["--method", "svd"], 0),  # a method that needs no calibration is not refined on calibration text by default
    (["--pipeline", "model"], 0),  # the whole-model pipeline has no blocks to refine
])
def test_block_refinement_is_on_by_default_in_the_block_pipeline(lm_dir, tmp_path, options, epochs):
    out = tmp_path / "small"
    assert main(["compress", str(lm_dir), "-o", str(out), "--params", "0.7", "--calib-seqs", "8", "--seq-len", "32",
                 "--batch-size", "2", "--no-eval", "--no-progress", "--json", str(tmp_path / "report.json"), *options]) == 0
    assert json.loads((out / "svdkit_compressed.json").read_text())["config"]["refine_epochs"] == epochs
    refinement = json.loads((tmp_path / "report.json").read_text()).get("refinement", [])
    assert len(refinement) == (2 if epochs else 0)  # one record per block of the 2-block model
    assert all(1 <= r["epochs"] <= epochs for r in refinement)


def test_refinement_asked_of_the_whole_model_pipeline_is_refused(lm_dir, tmp_path, capsys):
    code = main(["compress", str(lm_dir), "-o", str(tmp_path / "small"), "--params", "0.7", "--calib-seqs", "8",
                 "--seq-len", "32", "--refine-epochs", "2", "--pipeline", "model", "--no-progress"])
    assert code != 0 and "block refinement runs in the block pipeline" in capsys.readouterr().err


def test_compress_errors_are_reported_before_any_work(lm_dir, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    assert main(["compress", str(lm_dir), "-o", str(taken)]) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["compress", str(lm_dir), "-o", str(tmp_path / "new"), "--json", str(tmp_path / "no" / "r.json")]) == 1
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "new").exists()
    assert main(["compress", str(lm_dir), "-o", str(tmp_path / "new"), "--seq-len", "100000"]) == 1
    assert "longer than the model's context" in capsys.readouterr().err
    ids = tmp_path / "ids.pt"
    torch.save(torch.full((4, 40), 999), ids)
    assert main(["compress", str(lm_dir), "-o", str(tmp_path / "new"), "--calib", str(ids), "--seq-len", "32", "--no-eval"]) == 1
    assert "outside the model's vocabulary [0, 300)" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert main(["compress", str(lm_dir), "-o", str(tmp_path / "new"), "--calib", str(short), "--seq-len", "32", "--no-eval"]) == 1
    assert "shorter than one sequence" in capsys.readouterr().err


def test_a_gguf_file_that_is_not_a_model_is_refused(tmp_path, capsys):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file at all")
    pytest.importorskip("gguf")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_model(str(fake))
    fake.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ValueError, match=r"fake.gguf is a damaged GGUF file \(its header cannot be read"):
        load_model(str(fake))


@pytest.mark.distributed
def test_torchrun_with_two_processes_writes_the_one_process_result(lm_dir, tmp_path):
    """`torchrun --nproc_per_node=2 -m svdkit compress ...` (gloo on CPUs) against one process."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    args = ["compress", str(lm_dir), "--params", "0.7", "--calib-seqs", "8", "--seq-len", "32", "--batch-size", "2",
            "--no-eval", "--no-progress"]
    one = subprocess.run([sys.executable, "-m", "svdkit", *args, "-o", str(tmp_path / "one")], capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "svdkit", *args, "-o", str(tmp_path / "two")], capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    meta = {name: json.loads((tmp_path / name / "svdkit_compressed.json").read_text()) for name in ("one", "two")}
    assert meta["one"]["layers"] == meta["two"]["layers"]  # the same ranks everywhere
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("one", "two"))
    assert a.keys() == b.keys()
    for key in a:  # float32 factors of float64 factorizations: equal up to the rounding of sums
        assert float((a[key] - b[key]).norm() / a[key].norm().clamp_min(1e-30)) < 1e-5, key


def test_stream_from_the_checkpoint_writes_what_the_in_memory_run_writes(lm_dir, tmp_path, capsys):
    args = ["--params", "0.7", "--calib-seqs", "8", "--seq-len", "32", "--batch-size", "4", "--no-eval", "--no-progress"]
    assert main(["compress", str(lm_dir), "-o", str(tmp_path / "mem"), *args]) == 0
    assert main(["compress", str(lm_dir), "--stream", "-o", str(tmp_path / "disk"), *args]) == 0
    assert "svdkit eval" in capsys.readouterr().out
    memory, disk = (load_model(str(tmp_path / name)).module.state_dict() for name in ("mem", "disk"))
    assert memory.keys() == disk.keys()
    for key, value in memory.items():
        torch.testing.assert_close(disk[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("stream", [False, True])
def test_compress_saves_in_the_dtype_asked_for(lm_dir, tmp_path, capsys, stream):
    args = ["--params", "0.7", "--calib-seqs", "8", "--seq-len", "32", "--batch-size", "4", "--no-eval", "--no-progress"]
    out = tmp_path / "half"
    assert main(["compress", str(lm_dir), "-o", str(out), *args, "--dtype", "bfloat16", *(["--stream"] if stream else [])]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["auto_map"]["AutoModelForCausalLM"] == "modeling_svdkit.SvdkitLlamaForCausalLM"
    loaded = load_model(str(out))
    assert {p.dtype for p in loaded.module.parameters()} == {torch.bfloat16} and loaded.tokenizer is not None
    with pytest.raises(SystemExit):
        main(["compress", str(lm_dir), "-o", str(tmp_path / "int"), *args, "--dtype", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err
