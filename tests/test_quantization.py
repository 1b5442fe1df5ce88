"""Low rank and weight quantization together: torchao weight-only int8 / int4 on a compressed
model's factors and Linear layers, what is refused, and saving / loading through svdkit and
through plain transformers (in a process where svdkit cannot be imported)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from svdkit.compression import CompressConfig, compress, load_compressed, save_compressed
from svdkit.linalg import ParamRatio

from conftest import build_decoder

pytest.importorskip("torchao")
pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

from svdkit.quantization import check_platform, quantize_weights, required_rank_multiple, weight_bytes  # noqa: E402

HERE = Path(__file__).parent
VOCAB = 128


def _compressed(rank_multiple: int = 32, tied: bool = False, rank=ParamRatio(0.5)):
    """A 2-block LLaMA whose sizes suit int4 (hidden 128, MLP 256), factorized with ranks on ``rank_multiple``."""
    model = build_decoder("llama", causal=True, hidden=128, intermediate=256, vocab=VOCAB, tied=tied)
    compressed, report = compress(model, CompressConfig(method="svd", rank=rank, rank_multiple=rank_multiple, speed_aware="off"))
    assert any(row.rank for row in report.layers)
    return compressed, report


def _ids():
    return torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _factors(model):
    return [m for m in model.modules() if type(m).__name__ == "LowRankLinear"]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_quantized_compressed_model_saves_and_loads_with_identical_logits(mode, tmp_path):
    compressed, report = _compressed()
    assert all(row.rank is None or row.rank % 32 == 0 for row in report.layers)
    ids = _ids()
    dense_logits = _logits(compressed, ids)
    quantized, qreport = quantize_weights(compressed, mode)
    kind = {"int8": "Int8Tensor", "int4": "Int4OpaqueTensor"}[mode]
    factors = _factors(quantized)
    assert factors and all(type(f.u).__name__ == kind and type(f.v).__name__ == kind for f in factors)
    assert all(type(p).__name__ != kind for f in _factors(compressed) for p in (f.u, f.v))  # a copy: the input is kept
    # nothing skipped silently: every Linear weight and factor is quantized or listed with its reason
    linears = sum(isinstance(m, torch.nn.Linear) for m in quantized.modules()) + 2 * len(factors)
    assert sum(w.quantized for w in qreport.weights) == linears
    assert [w.name for w in qreport.kept] == ["model.embed_tokens.weight"] and "Embedding" in qreport.kept[0].reason
    assert qreport.model_bytes_after == weight_bytes(quantized) < 0.6 * weight_bytes(compressed)
    logits = _logits(quantized, ids)
    error = float((logits - dense_logits).norm() / dense_logits.norm())
    assert 0 < error < {"int8": 0.03, "int4": 0.3}[mode]  # quantized: close, not equal (random weights: no outliers to spare)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # int4: saved for svdkit only (tested below)
        save_compressed(quantized, tmp_path / "q", report=report)
    description = json.loads((tmp_path / "q" / "svdkit_compressed.json").read_text())
    assert description["quantization"]["mode"] == mode
    assert len(description["quantization"]["tensors"]) == linears
    assert "weight quantization" in (tmp_path / "q" / "README.md").read_text()
    loaded = load_compressed(tmp_path / "q")
    assert torch.equal(_logits(loaded, ids), logits)
    assert all(type(f.u).__name__ == kind for f in _factors(loaded))
    on_disk = sum(p.stat().st_size for p in (tmp_path / "q").glob("*.safetensors"))
    assert on_disk < 0.6 * weight_bytes(compressed)


def test_int4_refuses_ranks_off_its_group_size_naming_the_layers(tmp_path):
    compressed, _ = _compressed(rank_multiple=8, rank=40)  # rank 40: not a multiple of 32
    with pytest.raises(ValueError, match=r"do not fit int4 weight-only quantization with groups of 32: model\.layers\.0\..*\.u "
                                         r"\(\d+, 40\): input size 40 is not a multiple of the group size 32.*"
                                         r"CompressConfig\(rank_multiple=32\)"):
        quantize_weights(compressed, "int4")
    kept, report = quantize_weights(compressed, "int4", misaligned="keep")
    factors = [w for w in report.weights if w.name.endswith((".u", ".v"))]
    assert factors and all(not w.quantized and "40" in w.reason for w in factors)
    assert all(w.quantized for w in report.weights if w.name.endswith("weight") and "embed" not in w.name)
    assert required_rank_multiple("int4") == 32 and required_rank_multiple("int4", 128) == 128 and required_rank_multiple("int8") == 1
    # a dense weight whose input size the group does not divide: no rank multiple helps, the hint says so
    odd = build_decoder("llama", causal=True, hidden=64, intermediate=112, vocab=VOCAB)
    with pytest.raises(ValueError, match=r"down_proj\.weight \(64, 112\): input size 112 .* Fix: choose another group_size") as info:
        quantize_weights(odd, "int4")
    assert "rank_multiple" not in str(info.value)


def test_modes_and_platforms_without_a_kernel_are_refused():
    with pytest.raises(ValueError, match=r"'int4' has no kernel on cuda in svdkit \(it runs on cpu\); choose another mode \(int8\)"):
        check_platform("int4", "cuda", torch.float32)
    with pytest.raises(ValueError, match="unknown quantization mode 'int3'; choose one of"):
        check_platform("int3", "cpu", torch.float32)
    with pytest.raises(ValueError, match="quantizes floating-point weights; the model's weights are torch.int8"):
        check_platform("int8", "cpu", torch.int8)
    with pytest.raises(ValueError, match=r"group_size must be one of \[32, 64, 128\], got 48"):
        check_platform("int4", "cpu", torch.float32, 48)
    with pytest.raises(ValueError, match="takes no group_size"):
        check_platform("int8", "cpu", torch.float32, 32)
    model = build_decoder("llama", causal=True, vocab=VOCAB)
    quantized, _ = quantize_weights(model, "int8")
    with pytest.raises(ValueError, match="no floating-point parameters to quantize|quantized already"):
        quantize_weights(quantized, "int8")
    with pytest.raises(ValueError, match="misaligned: expected 'error' or 'keep'"):
        quantize_weights(model, "int8", misaligned="skip")


def test_a_quantized_model_is_saved_in_its_own_dtype(tmp_path):
    compressed, _ = _compressed()
    quantized, _ = quantize_weights(compressed, "int8")
    with pytest.raises(ValueError, match="quantized for torch.float32 activations: save it in its own dtype"):
        save_compressed(quantized, tmp_path / "q", dtype="bfloat16")
    assert not (tmp_path / "q").exists()


def test_a_tied_head_stays_tied_and_in_floating_point(tmp_path):
    model = build_decoder("llama", causal=True, hidden=128, intermediate=256, vocab=VOCAB, tied=True)
    quantized, report = quantize_weights(model, "int8")
    assert quantized.lm_head.weight is quantized.model.embed_tokens.weight
    assert [w.name for w in report.kept] == ["lm_head.weight"]
    assert "shared with model.embed_tokens.weight, which is no Linear" in report.kept[0].reason


def _plain(tmp_path, jobs):
    ids = _ids()
    torch.save(ids, tmp_path / "ids.pt")
    (tmp_path / "jobs.json").write_text(json.dumps({"ids": str(tmp_path / "ids.pt"), "jobs": jobs}))
    run = subprocess.run([sys.executable, "-I", str(HERE / "plain_transformers_load.py"), str(tmp_path / "jobs.json"),
                          str(tmp_path / "results.pt")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = torch.load(tmp_path / "results.pt", weights_only=False)
    assert results["svdkit_importable"] is False
    return ids, results


def test_plain_transformers_loads_int8_and_refuses_int4(tmp_path):
    """int8: ``from_pretrained(dir, trust_remote_code=True)`` with torchao installed (no svdkit)
    rebuilds the quantized factors through ``TorchAoConfig`` with the same logits. int4 (CPU
    ``Int4OpaqueTensor``): saved for svdkit only, with a warning that says why; transformers
    then refuses the directory instead of loading random weights."""
    compressed, report = _compressed()
    q8, _ = quantize_weights(compressed, "int8")
    save_compressed(q8, tmp_path / "int8", report=report)
    q4, _ = quantize_weights(compressed, "int4")
    with pytest.warns(UserWarning, match=r"for svdkit only: plain transformers cannot load it, because its weights are quantized in int4"):
        save_compressed(q4, tmp_path / "int4", report=report)
    description = json.loads((tmp_path / "int4" / "svdkit_compressed.json").read_text())
    assert description["transformers"]["auto_class"] is None and "Int4OpaqueTensor" in description["transformers"]["reason"]
    ids, results = _plain(tmp_path, [
        {"name": "int8", "action": "causal", "directory": str(tmp_path / "int8")},
        {"name": "int4", "action": "causal", "directory": str(tmp_path / "int4")},
        {"name": "int4 refuse", "action": "refuse", "directory": str(tmp_path / "int4")},
    ])
    assert "needs `pip install torchao`" in (tmp_path / "int8" / "README.md").read_text()
    assert "Plain transformers cannot load this directory: its weights are quantized in int4" in (tmp_path / "int4" / "README.md").read_text()
    int8 = results["int8"]
    assert "error" not in int8, int8
    assert int8["missing"] == [] and int8["unexpected"] == [] and len(int8["low_rank"]) == len(_factors(q8))
    assert torch.allclose(int8["logits"], _logits(load_compressed(tmp_path / "int8"), ids), rtol=1e-6, atol=1e-6)
    assert not (tmp_path / "int4" / "model.safetensors").exists()  # transformers finds no weights of its own there
    assert "error" in results["int4"] and "svdkit_model.safetensors" not in results["int4"]["error"], results["int4"]
    assert all(not text.startswith("loaded") for text in results["int4 refuse"].values()), results["int4 refuse"]


def test_compress_cli_quantizes_and_aligns_ranks(lm_dir, tmp_path, capsys):
    from svdkit.cli import main
    from svdkit.models import load_model

    args = ["--params", "0.7", "--calib-seqs", "8", "--seq-len", "32", "--batch-size", "4", "--no-eval", "--no-progress",
            "--speed-aware", "off"]
    out = tmp_path / "q8"
    assert main(["compress", str(lm_dir), "-o", str(out), *args, "--quantize", "int8", "--rank-multiple", "8",
                 "--json", str(tmp_path / "r.json")]) == 0
    assert "int8 weight-only:" in capsys.readouterr().out
    ranks = [row["rank"] for row in json.loads((tmp_path / "r.json").read_text())["layers"] if row["rank"]]
    assert ranks and all(k % 8 == 0 for k in ranks)
    description = json.loads((out / "svdkit_compressed.json").read_text())
    assert description["quantization"]["mode"] == "int8" and description["config"]["rank_multiple"] == 8
    loaded = load_model(str(out))
    assert any(type(p).__name__ == "Int8Tensor" for p in loaded.module.parameters())
    # errors, before any work
    for bad, message in [
        (["--quantize", "int4", "--rank-multiple", "8"], "--quantize int4 needs ranks that are multiples of 32"),
        (["--group-size", "64"], "--group-size applies to --quantize int4"),
        (["--quantize", "int8", "--stream"], "--quantize and --speed work on the compressed model in memory"),
        (["--quantize", "int4"], "down_proj.weight (64, 112): input size 112 is not a multiple of the group size 32"),
    ]:
        assert main(["compress", str(lm_dir), "-o", str(tmp_path / "bad"), *args, *bad]) == 1
        assert message in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit):
        main(["compress", str(lm_dir), "-o", str(tmp_path / "bad"), *args, "--rank-multiple", "0"])
    assert "--rank-multiple" in capsys.readouterr().err


def test_compress_and_eval_cli_time_the_model_against_dense(lm_dir, tmp_path, capsys):
    from svdkit.cli import main

    out = tmp_path / "fast"
    assert main(["compress", str(lm_dir), "-o", str(out), "--params", "0.7", "--calib-seqs", "8", "--seq-len", "32",
                 "--batch-size", "4", "--no-eval", "--no-progress", "--speed-aware", "off", "--speed",
                 "--json", str(tmp_path / "r.json")]) == 0
    speed = json.loads((tmp_path / "r.json").read_text())["speed"]
    assert {"decode b1 tok/s", "decode b8 tok/s", "prefill s", "dense decode b1 tok/s", "decode b1 x", "decode b8 x", "prefill x"} <= set(speed)
    assert speed["decode b1 x"] == pytest.approx(speed["decode b1 tok/s"] / speed["dense decode b1 tok/s"])
    assert "## Speed" in (out / "README.md").read_text()
    capsys.readouterr()
    assert main(["eval", str(out), "--max-tokens", "128", "--seq-len", "64", "--data", "in-domain", "--speed", "--no-progress",
                 "--json", str(tmp_path / "e.json")]) == 0
    results = json.loads((tmp_path / "e.json").read_text())
    for which in ("model", "source"):
        assert results[which]["decode b1 tok/s"] > 0 and results[which]["decode b8 tok/s"] > 0 and results[which]["prefill s"] > 0
    assert "decode b8 tok/s" in capsys.readouterr().out
