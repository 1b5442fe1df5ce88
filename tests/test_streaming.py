"""Compression straight into a directory: from a sharded checkpoint on disk, block by block, resumable.

A small LLaMA (GQA, tied head) saved as sharded safetensors stands in for a checkpoint bigger
than memory. Streaming from it must give exactly what compressing the model in memory gives; a
run killed between blocks must resume to the same result; nothing finished is lost.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from svdkit import CompressConfig, compress, load_compressed
from svdkit.compression.io import PROGRESS_NAME
from svdkit.compression.streaming import WORK_NAME, compress_to_directory

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = CompressConfig(budget=0.6)


def _batches() -> list[torch.Tensor]:
    return list(torch.randint(0, 100, (8, 16), generator=torch.Generator().manual_seed(1)).split(2))


@pytest.fixture
def checkpoint(tmp_path, make_decoder):
    model = make_decoder("llama", causal=True, tied=True, layers=4)
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder, max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").exists()
    return model, folder


def _same_outputs(a, b) -> None:
    ids = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=0)


def test_streaming_from_a_sharded_checkpoint_equals_compressing_in_memory(checkpoint, tmp_path):
    model, folder = checkpoint
    reference, reference_report = compress(model, CONFIG, _batches())
    report = compress_to_directory(folder, tmp_path / "out", CONFIG, _batches())
    assert [r.rank for r in report.layers] == [r.rank for r in reference_report.layers]
    assert report.model_params_after == reference_report.model_params_after
    out = tmp_path / "out"
    assert not (out / PROGRESS_NAME).exists() and not (out / WORK_NAME).exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert {Path(f).name for f in index.values()} >= {"model-block-00000.safetensors", "model-rest.safetensors"}
    again = load_compressed(out)  # lazily: an empty skeleton filled shard by shard
    assert again.lm_head.weight is again.model.embed_tokens.weight
    _same_outputs(again, reference)


def test_an_in_memory_model_streams_to_a_directory_too(make_decoder, tmp_path):
    model = make_decoder("qwen2", causal=True, layers=3)
    reference, _ = compress(model, CONFIG, _batches())
    compress_to_directory(model, tmp_path / "out", CONFIG, _batches())  # compresses `model` in place
    _same_outputs(load_compressed(tmp_path / "out"), reference)


_KILLED = textwrap.dedent("""
    import os, sys, torch
    from svdkit import CompressConfig
    from svdkit.compression import streaming

    done = streaming._Progress.block_done

    def die_after_block_1(self, index, *args, **kwargs):
        done(self, index, *args, **kwargs)
        if index == 1:
            os._exit(3)  # the process is killed between blocks

    streaming._Progress.block_done = die_after_block_1
    batches = list(torch.randint(0, 100, (8, 16), generator=torch.Generator().manual_seed(1)).split(2))
    epochs = int(sys.argv[3])
    config = CompressConfig(budget=0.6, **({"refine_epochs": epochs, "refine_lr": 1e-5} if epochs else {}))
    streaming.compress_to_directory(sys.argv[1], sys.argv[2], config, batches)
""")


@pytest.mark.parametrize("refine_epochs", [0, 2], ids=["plain", "refined"])
def test_a_run_killed_between_blocks_resumes_to_the_same_result(checkpoint, tmp_path, refine_epochs):
    """Block refinement toward the dense outputs resumes too: the dense model's inputs to the next
    block are kept beside the compressed model's."""
    model, folder = checkpoint
    config = CompressConfig(budget=0.6, **({"refine_epochs": refine_epochs, "refine_lr": 1e-5} if refine_epochs else {}))
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", _KILLED, str(folder), str(out), str(refine_epochs)], capture_output=True, text=True)
    assert killed.returncode == 3, killed.stderr[-2000:]
    progress = json.loads((out / PROGRESS_NAME).read_text())
    assert progress["blocks_done"] == 2
    assert (out / "model-block-00001.safetensors").exists() and not (out / "model-block-00002.safetensors").exists()
    with pytest.raises(FileExistsError, match="unfinished compression .2 blocks done.*--resume"):
        compress_to_directory(folder, out, config, _batches())
    with pytest.raises(ValueError, match="its config differs"):
        compress_to_directory(folder, out, dataclasses.replace(config, budget=0.5), _batches(), resume=True)
    with pytest.raises(ValueError, match="unfinished compression"):
        load_compressed(out)
    report = compress_to_directory(folder, out, config, _batches(), resume=True)
    reference, reference_report = compress(model, config, _batches())
    if refine_epochs:  # the blocks done after the restart were refined, as in one uninterrupted run
        assert report.refinement == reference_report.refinement  # the blocks before the restart are reported too
        assert any(r["best_epoch"] > 0 for r in report.refinement[2:])
    _same_outputs(load_compressed(out), reference)
    with pytest.raises(FileExistsError, match="finished compression: there is nothing to resume"):
        compress_to_directory(folder, out, config, _batches(), resume=True)


def test_resuming_refinement_without_the_dense_inputs_says_to_start_again(checkpoint, tmp_path):
    _, folder = checkpoint
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", _KILLED, str(folder), str(out), "2"], capture_output=True, text=True)
    assert killed.returncode == 3, killed.stderr[-2000:]
    kept = out / WORK_NAME / "inputs-rank-0.pt"
    state = torch.load(kept, weights_only=False)
    assert state["dense"] is not None and len(state["dense"]) == len(state["inputs"])
    del state["dense"]  # as an unfinished run that kept only the compressed model's inputs
    torch.save(state, kept)
    config = CompressConfig(budget=0.6, refine_epochs=2, refine_lr=1e-5)
    with pytest.raises(ValueError, match="cannot resume at block 2 with block refinement toward the dense model's outputs.*--overwrite"):
        compress_to_directory(folder, out, config, _batches(), resume=True)


def test_nothing_finished_is_touched_without_overwrite(checkpoint, tmp_path):
    _, folder = checkpoint
    compress_to_directory(folder, tmp_path / "out", CONFIG, _batches())
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(FileExistsError, match="overwrite"):
        compress_to_directory(folder, tmp_path / "out", CONFIG, _batches())
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        compress_to_directory(folder, tmp_path / "elsewhere", CONFIG, _batches(), resume=True)


def _resident_file_mib() -> float:
    """This process's resident file-backed memory (Linux ``/proc/self/status`` RssFile), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no RssFile in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_reading_a_checkpoint_tensor_by_tensor_keeps_no_read_pages_resident(tmp_path):
    """Each tensor is copied out of a mapping of its own: after reading (and freeing) 96 MiB of
    tensors, the process holds none of the file's pages, so a block-by-block pass over a
    checkpoint holds one block, not every block read so far."""
    from safetensors.torch import save_file

    from svdkit.checkpoint import Checkpoint

    tensors = {f"layer{i}.weight": torch.randn(1024, 2048) for i in range(12)}  # 12 x 8 MiB
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with Checkpoint(tmp_path / "model.safetensors") as checkpoint:
        before = _resident_file_mib()
        for key, expected in tensors.items():
            got = checkpoint.tensor(key)
            assert torch.equal(got, expected)
            del got
        grown = _resident_file_mib() - before
    assert grown < 16, f"{grown:.0f} MiB of the checkpoint stayed resident after reading 96 MiB tensor by tensor"


@pytest.fixture(scope="module")
def _killed_once(tmp_path_factory):
    from conftest import build_decoder

    root = tmp_path_factory.mktemp("killed")
    build_decoder("llama", causal=True, tied=True, layers=4).save_pretrained(root / "ckpt", max_shard_size="40KB")
    killed = subprocess.run([sys.executable, "-c", _KILLED, str(root / "ckpt"), str(root / "out"), "0"], capture_output=True, text=True)
    assert killed.returncode == 3, killed.stderr[-2000:]
    return root


@pytest.fixture
def killed_after_two_blocks(_killed_once, tmp_path):
    """An unfinished output (a copy of one killed after its second block) and its checkpoint."""
    shutil.copytree(_killed_once / "out", tmp_path / "out")
    return _killed_once / "ckpt", tmp_path / "out"


def _no_work(monkeypatch):
    """Make any block compression fail: a refusal must come before any work."""
    from svdkit.compression.block_driver import BlockDriver

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the refusal")

    monkeypatch.setattr(BlockDriver, "measure", refuse)
    monkeypatch.setattr(BlockDriver, "compress", refuse)


def test_a_run_that_died_before_its_first_block_can_be_resumed_or_overwritten(checkpoint, tmp_path):
    _, folder = checkpoint
    out = tmp_path / "out"
    (out / WORK_NAME / "rank-0").mkdir(parents=True)  # what a run killed in its curvature pass leaves
    with pytest.raises(FileExistsError, match=r"stopped before its first block \(only \.svdkit-work/\): pass resume=True \(--resume\) or overwrite=True"):
        compress_to_directory(folder, out, CONFIG, _batches())
    compress_to_directory(folder, out, CONFIG, _batches(), resume=True)
    assert load_compressed(out) is not None
    shutil.rmtree(out)
    (out / WORK_NAME).mkdir(parents=True)
    compress_to_directory(folder, out, CONFIG, _batches(), overwrite=True)
    assert not (out / WORK_NAME).exists()


def test_a_damaged_progress_file_is_named(killed_after_two_blocks):
    folder, out = killed_after_two_blocks
    (out / PROGRESS_NAME).write_text("{ not json")
    with pytest.raises(ValueError, match=r"cannot read .*svdkit_progress\.json.*damaged: start again with --overwrite"):
        compress_to_directory(folder, out, CONFIG, _batches(), resume=True)


def test_a_deleted_work_directory_is_named(killed_after_two_blocks, monkeypatch):
    folder, out = killed_after_two_blocks
    shutil.rmtree(out / WORK_NAME)
    _no_work(monkeypatch)
    with pytest.raises(FileNotFoundError, match=r"work directory .*\.svdkit-work is missing; start again with --overwrite"):
        compress_to_directory(folder, out, CONFIG, _batches(), resume=True)


@pytest.mark.parametrize("damage", ["truncate", "edit"])
def test_a_changed_finished_shard_is_refused_before_any_work(killed_after_two_blocks, monkeypatch, damage):
    folder, out = killed_after_two_blocks
    shard = out / "model-block-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:-4] + b"\x00\x00\x80\x3f")
    _no_work(monkeypatch)
    with pytest.raises(ValueError, match=r"finished shard model-block-00001\.safetensors does not match the SHA-256 .*--overwrite"):
        compress_to_directory(folder, out, CONFIG, _batches(), resume=True)


def test_a_resume_that_differs_names_the_field_and_both_values(killed_after_two_blocks, monkeypatch):
    folder, out = killed_after_two_blocks
    _no_work(monkeypatch)
    with pytest.raises(ValueError, match=r"config differs from this run's \(budget: 0\.6 then, 0\.5 now\)"):
        compress_to_directory(folder, out, CompressConfig(budget=0.5), _batches(), resume=True)
    other = list(torch.randint(0, 100, (8, 16), generator=torch.Generator().manual_seed(1)).split(4))
    with pytest.raises(ValueError, match=r"calibration differs .*4 batches of \(2, 16\) then, 2 batches of \(4, 16\) now.*--batch-size"):
        compress_to_directory(folder, out, CONFIG, other, resume=True)
    state = json.loads((out / PROGRESS_NAME).read_text())
    (out / PROGRESS_NAME).write_text(json.dumps(dict(state, world=2)))
    with pytest.raises(ValueError, match=r"ran with 2 process\(es\), this run has 1; resume it with 2 \(torchrun --nproc_per_node=2\)"):
        compress_to_directory(folder, out, CONFIG, _batches(), resume=True)


def test_the_same_source_spelled_relative_or_absolute_resumes(killed_after_two_blocks, monkeypatch):
    folder, out = killed_after_two_blocks
    monkeypatch.chdir(folder.parent)
    compress_to_directory(Path(folder.name), out, CONFIG, _batches(), resume=True, source_spec=f"./{folder.name}")
    assert not (out / PROGRESS_NAME).exists()
