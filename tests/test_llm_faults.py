"""Bad checkpoints and bad options on the LLM paths: each is the right result or an error that
names the thing and says what to do, before any long work.

Models are tiny (a 2-block LLaMA of conftest.py's ``lm_dir``, a 4-block LLaMA written as GGUF
here, a 2-block GPT-2), with random weights: structure, never quality.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

from svdkit.cli import main
from svdkit.models import load_model

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--calib-seqs", "8", "--seq-len", "32", "--batch-size", "4", "--no-progress"]


def _copy_without(source, target, drop=(), replace=None):
    """A copy of the checkpoint directory ``source`` whose model.safetensors lacks ``drop`` and
    holds ``replace``'s tensors instead of its own."""
    shutil.copytree(source, target)
    tensors = safetensors_torch.load_file(target / "model.safetensors")
    for key in drop:
        del tensors[key]
    tensors.update(replace or {})
    safetensors_torch.save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


# --- 1. a transformers checkpoint that lacks weights ----------------------------------------------


def test_a_checkpoint_without_a_weight_is_refused_naming_it(lm_dir, tmp_path, capsys):
    broken = _copy_without(lm_dir, tmp_path / "broken", drop=["model.layers.1.mlp.down_proj.weight"])
    message = (r"broken lacks 1 weight\(s\) that LlamaForCausalLM needs: model.layers.1.mlp.down_proj.weight; transformers would "
               r"initialize them at random. Complete the checkpoint .* or pass allow_missing=True to svdkit.load_model")
    with pytest.raises(ValueError, match=message):
        load_model(str(broken))
    for argv in (["compress", str(broken), "-o", str(tmp_path / "out"), "--no-eval", *SMALL], ["eval", str(broken), "--no-progress"]):
        assert main(argv) == 1
        assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
    # asked for explicitly, the partial load goes on: every weight but the missing one is the checkpoint's
    partial = load_model(str(broken), allow_missing=True).module
    full = load_model(str(lm_dir)).module  # the complete checkpoint (its tied head is not "missing") loads
    for name, value in full.state_dict().items():
        if name != "model.layers.1.mlp.down_proj.weight":
            torch.testing.assert_close(partial.state_dict()[name], value, rtol=0, atol=0)
    assert full.lm_head.weight is full.model.embed_tokens.weight


def test_a_sharded_checkpoint_missing_a_weight_or_a_shard_is_refused(lm_dir, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(lm_dir)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    key = "model.layers.0.self_attn.q_proj.weight"
    shard = sharded / index["weight_map"][key]
    tensors = safetensors_torch.load_file(shard)
    del tensors[key]
    safetensors_torch.save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"sharded lacks 1 weight\(s\) that LlamaForCausalLM needs: model.layers.0.self_attn.q_proj.weight"):
        load_model(str(sharded))
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"names \d+ shards, 1 of them missing: {shard.name} \(\d+ tensors\)"):
        load_model(str(sharded))


def test_a_weight_of_another_shape_is_refused_naming_both_shapes(lm_dir, tmp_path):
    broken = _copy_without(lm_dir, tmp_path / "broken", replace={"model.layers.1.self_attn.q_proj.weight": torch.zeros(64, 32)})
    with pytest.raises(ValueError, match=r"broken does not fit LlamaForCausalLM: 1 weight\(s\) of another shape: "
                                         r"model.layers.1.self_attn.q_proj.weight is \(64, 32\) in the checkpoint, \(64, 64\) in the model"):
        load_model(str(broken))


# --- 2. GGUF files with tensors left out, or cut short ---------------------------------------------


def _write_gguf(path, *, skip=(), blocks=4, hidden=32, ff=64, heads=4, kv_heads=2) -> dict[str, np.ndarray]:
    """A tiny random LLaMA as a GGUF file (float32 tensors, a byte-level BPE vocabulary); returns
    the tensors written."""
    gguf = pytest.importorskip("gguf")
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # the byte alphabet of GPT-2-style vocabularies

    tokens = ["<|endoftext|>", *bytes_to_unicode().values(), "he"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(blocks)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3] + [1] * (len(tokens) - 1))
    writer.add_token_merges(["h e"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_pad_token_id(0)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (len(tokens), hidden), "output_norm.weight": (hidden,)}
    kv = hidden // heads * kv_heads
    for i in range(blocks):
        shapes.update({
            f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,),
            f"blk.{i}.attn_q.weight": (hidden, hidden), f"blk.{i}.attn_k.weight": (kv, hidden), f"blk.{i}.attn_v.weight": (kv, hidden),
            f"blk.{i}.attn_output.weight": (hidden, hidden), f"blk.{i}.ffn_gate.weight": (ff, hidden),
            f"blk.{i}.ffn_up.weight": (ff, hidden), f"blk.{i}.ffn_down.weight": (hidden, ff),
        })
    written = {}
    for name, shape in shapes.items():
        if name not in skip:
            written[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
            writer.add_tensor(name, written[name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


BLOCK_3 = [f"blk.3.{n}.weight" for n in ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]


def test_a_gguf_file_loads_the_tensors_it_holds(tmp_path):
    written = _write_gguf(tmp_path / "tiny.gguf")
    loaded = load_model(str(tmp_path / "tiny.gguf"))
    assert loaded.is_causal_lm and loaded.tokenizer is not None
    layer = loaded.module.model.layers[3]
    np.testing.assert_array_equal(layer.mlp.down_proj.weight.detach().numpy(), written["blk.3.ffn_down.weight"])
    np.testing.assert_array_equal(layer.self_attn.v_proj.weight.detach().numpy(), written["blk.3.attn_v.weight"])


def test_a_gguf_file_without_a_block_is_refused_naming_its_tensors(tmp_path, capsys):
    path = tmp_path / "holes.gguf"
    _write_gguf(path, skip=BLOCK_3)
    message = (r"holes.gguf lacks 9 weight\(s\) that LlamaForCausalLM needs: model.layers.3.input_layernorm.weight, "
               r"model.layers.3.mlp.down_proj.weight, .* and 1 more; transformers would initialize them at random")
    with pytest.raises(ValueError, match=message):
        load_model(str(path))
    assert main(["eval", str(path), "--no-progress"]) == 1
    assert re.search(message, capsys.readouterr().err)
    partial = load_model(str(path), allow_missing=True).module  # asked for: block 3 is transformers' random init
    assert float(partial.model.layers[3].self_attn.q_proj.weight.detach().std()) == pytest.approx(0.02, abs=0.005)


@pytest.mark.parametrize("keep", [0.8, 0.01])  # cut in the tensor data / in the header
def test_a_truncated_gguf_file_says_so(tmp_path, keep):
    whole = tmp_path / "whole.gguf"
    _write_gguf(whole)
    data = whole.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match=rf"cut.gguf is truncated: it holds {int(len(data) * keep):,} bytes but its header describes "
                                         r"at least [\d,]+; the download or copy was cut short: fetch the file again"):
        load_model(str(cut))


# --- 4. svdkit eval --------------------------------------------------------------------------------


def test_eval_windows_stay_within_the_context(lm_dir, tmp_path, capsys, make_decoder):
    from svdkit.eval import perplexity

    assert main(["eval", str(lm_dir), "--seq-len", "256", "--no-progress"]) == 1
    assert f"--seq-len 256 is longer than the context of {str(lm_dir)!r} (128 tokens): pass --seq-len 128 or less" in capsys.readouterr().err
    model = make_decoder("llama", causal=True)  # context 128
    ids = torch.randint(0, 100, (600,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"seq_len 256 is longer than the model's context \(128 tokens, its config's max_position_embeddings\)"):
        perplexity(model, ids, seq_len=256)
    # the default window is 512 shortened to the context, not 512 positions the model never saw
    assert perplexity(model, ids).to_dict() == perplexity(model, ids, seq_len=128).to_dict()
    assert main(["eval", str(lm_dir), "--max-tokens", "300", "--json", str(tmp_path / "e.json"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["model"]["in-domain"] > 1


@pytest.fixture(scope="module")
def compressed(lm_dir, tmp_path_factory):
    """A compressed copy of lm_dir, made from a copy of it (so that a test can delete the source)."""
    root = tmp_path_factory.mktemp("compressed")
    source = root / "source"
    shutil.copytree(lm_dir, source)
    out = root / "small"
    assert main(["compress", str(source), "-o", str(out), "--params", "0.7", "--no-eval", *SMALL]) == 0
    return source, out


def test_eval_with_its_reference_gone_says_so_before_measuring(compressed, tmp_path, capsys, monkeypatch):
    import svdkit.eval

    source, out = compressed
    moved = tmp_path / "moved"
    shutil.move(source, moved)
    calls = []
    monkeypatch.setattr(svdkit.eval, "language_model_quality", lambda *a, **k: calls.append(1) or {})
    try:
        assert main(["eval", str(out), "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert f"the reference model that {out} was compressed from, {str(source)!r}, is gone" in err
        assert "pass --no-reference to measure the compressed model alone" in err
        assert calls == []  # nothing was measured first
    finally:
        shutil.move(moved, source)
    monkeypatch.undo()
    assert main(["eval", str(out), "--no-reference", "--max-tokens", "200", "--no-progress"]) == 0


def test_an_unfinished_streamed_directory_says_how_to_finish_it(tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "svdkit_progress.json").write_text(json.dumps({"blocks_done": 3, "source": "/models/llama"}))
    message = (f"{unfinished} holds an unfinished compression: 3 block(s) done (svdkit_progress.json); finish it with "
               f"`svdkit compress /models/llama -o {unfinished} --resume` with the options of the first run")
    with pytest.raises(ValueError, match=re.escape(message)):
        load_model(str(unfinished))
    assert main(["eval", str(unfinished)]) == 1
    assert message in capsys.readouterr().err


def test_a_damaged_compressed_directory_can_be_measured_with_no_verify(compressed, tmp_path, capsys):
    _, out = compressed
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    weights = damaged / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # one bit of the last tensor's data
    weights.write_bytes(bytes(data))
    assert main(["eval", str(damaged), "--no-reference", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "does not match the SHA-256 recorded in svdkit_compressed.json" in err
    assert "--no-verify in svdkit eval" in err
    assert main(["eval", str(damaged), "--no-reference", "--no-verify", "--max-tokens", "200", "--no-progress"]) == 0


# --- 5. families and devices ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    from conftest import build_tokenizer

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300, n_positions=128, bos_token_id=0, eos_token_id=0)
    folder = tmp_path_factory.mktemp("gpt2") / "tiny-gpt2"
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


def test_one_causal_lm_test_knows_gpt2s_head_model(gpt2_dir):
    from svdkit.causal_lm import is_causal_lm

    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)
    assert is_causal_lm(transformers.GPT2LMHeadModel(config)) and not is_causal_lm(transformers.GPT2Model(config))
    assert is_causal_lm(transformers.AutoConfig.from_pretrained(gpt2_dir))  # architectures: GPT2LMHeadModel
    bert = transformers.BertConfig(architectures=["BertForMaskedLM"])
    assert not is_causal_lm(bert) and not is_causal_lm(torch.nn.Linear(2, 2))
    loaded = load_model(str(gpt2_dir))
    assert loaded.is_causal_lm and type(loaded.module).__name__ == "GPT2LMHeadModel"


def test_gpt2_compresses_block_by_block_as_the_whole_model_does(gpt2_dir, tmp_path, capsys):
    """GPT-2's blocks take the cache and the mask by position: the replay must give each block the
    inputs the model gives it. With only the second block targeted, its inputs are the dense
    model's in both pipelines, so both fit it the same factors."""
    from svdkit import CompressConfig, compress
    from svdkit.layers import LowRankLinear

    model = load_model(str(gpt2_dir)).module
    batches = list(torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(1)).split(4))
    config = dict(method="whiten", rank=8, target_modules=r"transformer\.h\.1\..*")
    whole, r1 = compress(model, CompressConfig(**config, pipeline="model"), batches)
    blocks, r2 = compress(model, CompressConfig(**config, pipeline="blocks"), batches)
    assert (r1.pipeline, r2.pipeline) == ("model", "blocks") and r2.totals()["compressed"] == 4
    for name, module in whole.named_modules():
        if isinstance(module, LowRankLinear):
            torch.testing.assert_close(blocks.get_submodule(name).dense_weight(), module.dense_weight(), rtol=1e-5, atol=1e-6)
    assert main(["compress", str(gpt2_dir), "-o", str(tmp_path / "g"), "--json", str(tmp_path / "g.json"), *SMALL]) == 0
    report = json.loads((tmp_path / "g.json").read_text())
    assert report["totals"]["pipeline"] == "blocks" and "ppl in-domain (dense -> compressed)" in report["quality"]


def test_a_device_this_machine_lacks_is_refused_before_loading(lm_dir, tmp_path, capsys):
    from svdkit.devices import check_device

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = f"cuda:{count}" if count else "cuda"
    assert main(["compress", str(lm_dir), "-o", str(tmp_path / "o"), "--device", device, *SMALL]) == 1
    err = capsys.readouterr().err
    assert re.search(rf"--device '{device}': (this torch is built without CUDA|no CUDA device is visible|this machine has {count} CUDA "
                     r"device\(s\)); available here: cpu", err), err
    assert "loading" not in err and not (tmp_path / "o").exists()
    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device: 'gpu0' is not a device name"):
        check_device("gpu0")
    with pytest.raises(ValueError, match=rf"device '{device}': .*available here: cpu"):
        load_model(str(lm_dir), device=device)


# --- 7. a streamed source of the wrong shape or incomplete -----------------------------------------


def _sharded(lm_dir, folder):
    transformers.AutoModelForCausalLM.from_pretrained(lm_dir).save_pretrained(folder, max_shard_size="100KB")
    shutil.copy(lm_dir / "tokenizer.json", folder)
    shutil.copy(lm_dir / "tokenizer_config.json", folder)
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]


def test_a_streamed_tensor_of_the_wrong_shape_is_named_before_any_work(lm_dir, tmp_path, capsys):
    source = tmp_path / "source"
    weight_map = _sharded(lm_dir, source)
    key = "model.layers.1.mlp.up_proj.weight"
    shard = source / weight_map[key]
    tensors = safetensors_torch.load_file(shard)
    tensors[key] = torch.zeros(112, 32)
    safetensors_torch.save_file(tensors, shard, metadata={"format": "pt"})
    assert main(["compress", str(source), "-o", str(tmp_path / "out"), "--stream", *SMALL]) == 1
    err = capsys.readouterr().err
    assert (f"the checkpoint {str(source)!r} does not fit LlamaForCausalLM: {key} in {shard.name} has shape (112, 32), "
            "the model expects (112, 64) (is the checkpoint from another model") in err
    assert not (tmp_path / "out" / "svdkit_progress.json").exists()  # refused before the curvature pass
    del tensors[key]
    safetensors_torch.save_file(tensors, shard, metadata={"format": "pt"})
    index = source / "model.safetensors.index.json"
    meta = json.loads(index.read_text())
    del meta["weight_map"][key]
    index.write_text(json.dumps(meta))
    assert main(["compress", str(source), "-o", str(tmp_path / "out"), "--stream", *SMALL]) == 1
    assert f"it lacks 1 tensor(s): {key} (complete the checkpoint: a shard or tensor is missing)" in capsys.readouterr().err


def test_a_checkpoint_read_tensor_by_tensor_checks_the_expected_shape(lm_dir):
    from svdkit.checkpoint import Checkpoint

    key = "model.layers.0.mlp.down_proj.weight"
    with Checkpoint(lm_dir) as checkpoint:
        assert checkpoint.shape(key) == (64, 112)
        assert checkpoint.tensor(key, shape=(64, 112)).shape == (64, 112)
        with pytest.raises(ValueError, match=rf"tensor '{key}' in '.*model.safetensors' has shape \(64, 112\), but the model expects \(112, 64\)"):
            checkpoint.tensor(key, shape=(112, 64))


# --- 3, 6, 8. compress options ---------------------------------------------------------------------


def test_sweep_budgets_get_one_output_each(lm_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compress", str(lm_dir), "-o", str(out), "--params", "0.501,0.504", "--no-eval", *SMALL]) == 0
    budgets = {path.name: json.loads((path / "svdkit_compressed.json").read_text())["config"]["budget"] for path in tmp_path.glob("out-*")}
    assert budgets == {"out-50.1": 0.501, "out-50.4": 0.504}
    capsys.readouterr()
    for params, message in (("0.8,0.8", "--params lists 0.8 twice: give each fraction once"),
                            ("0.5000001,0.5000002", f"--params 0.5000001 and 0.5000002 would both be written to {out}-50: give fractions")):
        assert main(["compress", str(lm_dir), "-o", str(out), "--params", params, "--no-eval", *SMALL]) == 1
        err = capsys.readouterr().err
        assert message in err and "loading" not in err, err


def test_seq_len_one_is_refused_before_loading(lm_dir, tmp_path, capsys):
    assert main(["compress", str(lm_dir), "-o", str(tmp_path / "o"), "--seq-len", "1"]) == 1
    err = capsys.readouterr().err
    assert "--seq-len must be >= 2 (one token of context and one to predict in each window), got 1" in err and "loading" not in err


def test_a_rank_that_keeps_every_layer_dense_is_refused(lm_dir, tmp_path, capsys):
    assert main(["compress", str(lm_dir), "-o", str(tmp_path / "o"), "--rank", "100000", *SMALL]) == 1
    err = capsys.readouterr().err
    assert ("--rank 100000 keeps all 14 targeted layers dense: a rank-k factorization of an m x n layer saves parameters only "
            "when k < mn/(m+n), at most 40.7 here (model.layers.0.mlp.gate_proj, 112x64); pass a smaller --rank") in err
    assert "compressing" not in err and not (tmp_path / "o").exists()
    # a spectrum-based rank can keep everything dense too: found after the work, the dense copy is not saved
    assert main(["compress", str(lm_dir), "-o", str(tmp_path / "o"), "--energy", "1.0", "--no-eval", *SMALL]) == 1
    captured = capsys.readouterr()
    assert "total (0/14 factorized)" in captured.out
    assert ("nothing was factorized: all 14 targeted layers stay dense at --energy 1.0, so the result would be a dense copy; "
            "ask for fewer parameters") in captured.err
    assert not (tmp_path / "o").exists()


def test_a_calibration_file_that_is_not_a_tensor_is_one_line(lm_dir, tmp_path, capsys):
    not_tensor = tmp_path / "arrays.pt"
    torch.save({"ids": np.zeros((4, 40), dtype=np.int64)}, not_tensor)
    assert main(["compress", str(lm_dir), "-o", str(tmp_path / "o"), "--calib", str(not_tensor), *SMALL]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert re.fullmatch(
        re.escape(f"svdkit compress: error: cannot read {not_tensor}: it holds Python objects besides tensors (")
        + r"numpy\.(_core|core)\.multiarray\._reconstruct"
        + re.escape("), which are not read: no code from a file is run; it must hold one tensor of token ids, of shape (T,) or (N, L), "
                    "saved with torch.save(tensor, 'arrays.pt')"),
        err[-1],
    ), err
    assert not any("weights_only" in line for line in err)
