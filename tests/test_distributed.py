"""Multi-process compression with torch.distributed: two CPU processes (gloo) against one.

Each process takes every other calibration batch; statistics are summed over both, each layer's
owner factorizes it and broadcasts the factors. The result equals the one-process result up to
the order of floating-point sums: identical ranks, factors within 1e-10 relative (float64 model),
perplexity within 1e-9 relative. A failure on one process stops both with its message.
"""

from __future__ import annotations

import faulthandler
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from svdkit import CompressConfig, compress, load_compressed, save_compressed
from svdkit.distributed import Group, shard, shard_count
from svdkit.eval import perplexity

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

CONFIG = dict(method="fisher", budget=0.6, pipeline="blocks")


def _model_and_batches(family: str):
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import build_decoder

    if family == "mixtral":  # a mixture of experts: its experts' statistics follow the routing on each rank
        from test_moe import mixtral

        model = mixtral().double()
    else:
        model = build_decoder(family, causal=True, layers=3, kv_heads=2).double()
    ids = torch.randint(0, 100, (12, 16), generator=torch.Generator().manual_seed(1))
    return model, list(ids.split(2))


def _worker(rank: int, world: int, init_file: str, out: str, family: str, fault: str | None, gradient_batches: int | None,
            fields: dict | None = None) -> None:
    os.environ["LOCAL_RANK"] = str(rank)
    faulthandler.enable(all_threads=True)  # a process that aborts shows where each of its threads was
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, batches = _model_and_batches(family)
        if fault == "nan-batch-3":
            batches[3] = batches[3].double() * float("nan")  # not token ids any more: a bad batch (rank 1's share)
        elif fault == "vocabulary-on-rank-1" and rank == 1:
            batches[0] = batches[0] + 1000  # a check before any collective fails on rank 1 only
        elif fault == "other-data-on-rank-1" and rank == 1:
            batches = [b.flip(0) for b in batches]
        try:
            small, report = compress(model, CompressConfig(**CONFIG, gradient_batches=gradient_batches, **(fields or {})), batches)
        except Exception as exc:
            Path(out, f"{rank}.err").write_text(f"{type(exc).__name__}: {exc}")
            return
        torch.save({"state": small.state_dict(), "ranks": [r.rank for r in report.layers], "refinement": report.refinement},
                   Path(out, f"{rank}.pt"))
        if rank == 0:
            save_compressed(small, Path(out, "model"))
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path: Path, family: str, fault: str | None = None, gradient_batches: int | None = None, fields: dict | None = None) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out), family, fault, gradient_batches, fields), nprocs=2, join=True)
    return out


@pytest.mark.parametrize("family, gradient_batches, fields", [
    ("llama", None, {}), ("qwen2", 3, {}), ("mixtral", None, {}), ("llama", 3, {"curvature": "sampled"}),
    ("qwen2", None, {"refine_epochs": 3, "refine_lr": 1e-5, "refine_held_out": 0.3}),
], ids=["llama", "qwen2-3-gradient-batches", "mixtral", "llama-sampled", "qwen2-refined"])
@pytest.mark.distributed
def test_two_processes_give_the_one_process_result(tmp_path, family, gradient_batches, fields):
    """With ``gradient_batches=3`` of 6 the curvature comes from the same three batches (two on
    rank 0, one on rank 1) as in one process; a random curvature (tokens sampled from the model)
    draws for each batch what one process draws for it; block refinement takes one process's
    steps (each on the rank that holds its batch) and holds out the same batches (4 and 5, one on
    each rank)."""
    model, batches = _model_and_batches(family)
    alone, report = compress(model, CompressConfig(**CONFIG, gradient_batches=gradient_batches, **fields), batches)
    if "refine_epochs" in fields:
        assert any(r["best_epoch"] > 0 for r in report.refinement)  # refinement changed something to compare
    out = _spawn(tmp_path, family, gradient_batches=gradient_batches, fields=fields)
    ids = torch.randint(0, 100, (64,), generator=torch.Generator().manual_seed(3))
    reference = perplexity(alone, ids, seq_len=32).perplexity
    for rank in (0, 1):
        result = torch.load(out / f"{rank}.pt", weights_only=False)
        assert result["ranks"] == [r.rank for r in report.layers]
        assert [r["epochs"] for r in result["refinement"]] == [r["epochs"] for r in report.refinement]
        for got, want in zip(result["refinement"], report.refinement):
            assert got["held_out_after"] == pytest.approx(want["held_out_after"], rel=1e-6)  # a difference of outputs: the sums' order shows more
        for key, value in alone.state_dict().items():
            got = result["state"][key]
            assert float((got - value).norm() / value.norm().clamp_min(1e-300)) <= 1e-10, key
    # what rank 0 wrote scores as the one-process model does
    written = load_compressed(out / "model")
    assert perplexity(written, ids, seq_len=32).perplexity == pytest.approx(reference, rel=1e-9)


@pytest.mark.distributed
@pytest.mark.parametrize("fault, message", [
    ("vocabulary-on-rank-1", "ValueError: calibration batch 0 holds token ids in"),
    ("other-data-on-rank-1", "ValueError: the ranks were given different calibration data (ranks [1] differ from rank 0)"),
])
def test_a_failure_before_the_first_block_stops_every_rank_with_its_message(tmp_path, fault, message):
    """A check that fails on one rank only (before any collective), or ranks that were given different
    calibration data: every rank stops with the message, nobody waits for a rank that is gone."""
    out = _spawn(tmp_path, "llama", fault=fault)
    messages = {rank: (out / f"{rank}.err").read_text() for rank in (0, 1)}
    assert not any((out / f"{rank}.pt").exists() for rank in (0, 1))
    assert message in messages[1], messages[1]
    assert message in messages[0], messages[0]


@pytest.mark.distributed
def test_a_failure_on_one_process_stops_both_with_its_message(tmp_path):
    out = _spawn(tmp_path, "llama", fault="nan-batch-3")  # batch 3 is on rank 1 (every other batch)
    messages = {rank: (out / f"{rank}.err").read_text() for rank in (0, 1)}
    assert not any((out / f"{rank}.pt").exists() for rank in (0, 1))
    assert messages[1].startswith("ValueError: calibration batch 3 in layer model.embed_tokens"), messages[1]
    assert messages[0] == f"RankFailure: rank 1 of 2 failed: {messages[1]}"


def test_owners_share_the_cost_and_shards_are_disjoint():
    group = Group(rank=1, world=3)
    owners = group.owners([100, 90, 10, 10, 80, 5])
    loads = [sum(c for c, o in zip([100, 90, 10, 10, 80, 5], owners) if o == r) for r in range(3)]
    assert sorted(loads) == [95, 100, 100]  # LPT: 100 | 90+10 | 80+10+5
    items = list(range(10))
    parts = [shard(items, Group(rank=r, world=3)) for r in range(3)]
    assert sorted(x for part in parts for x in part) == items and parts[1] == [1, 4, 7]
    with pytest.raises(ValueError, match="2 calibration batch"):
        shard([0, 1], Group(rank=0, world=3))


def _analysis_worker(rank: int, world: int, init_file: str, checkpoint: str, out: str) -> None:
    faulthandler.enable(all_threads=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from svdkit.analysis import analyze_weights

        table = analyze_weights(checkpoint, keep_spectra=False)
        torch.save({"records": table.to_records(), "jobs": table.meta}, Path(out, f"analysis-{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_processes_analyse_the_shards_of_a_checkpoint_as_one_does(tmp_path):
    from svdkit.analysis import analyze_weights

    model, _ = _model_and_batches("llama")
    model.float().save_pretrained(tmp_path / "ckpt", max_shard_size="60KB")
    alone = analyze_weights(tmp_path / "ckpt", keep_spectra=False).to_records()
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(_analysis_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "ckpt"), str(out)), nprocs=2, join=True)
    for rank in (0, 1):
        records = torch.load(out / f"analysis-{rank}.pt", weights_only=False)["records"]
        assert [r["name"] for r in records] == [r["name"] for r in alone]
        for mine, reference in zip(records, alone):
            for key, value in reference.items():
                if isinstance(value, float) and value == value:  # NaN columns stay NaN
                    assert mine[key] == pytest.approx(value, rel=1e-12, abs=1e-300), (reference["name"], key)
                else:
                    assert mine[key] == value or (isinstance(value, float) and mine[key] != mine[key]), (reference["name"], key)


def test_shard_counts_take_the_first_items_of_the_whole_list_together():
    items = list(range(10))
    for world in (1, 2, 3, 4):
        for total in range(world, 11):
            taken = sorted(x for rank in range(world) for x in shard(items, Group(rank, world))[: shard_count(total, Group(rank, world))])
            assert taken == items[:total], (world, total)
    with pytest.raises(ValueError, match="gradient_batches=1 cannot be shared by 2 processes: give at least 2"):
        shard_count(1, Group(1, 2), what="gradient_batches")

