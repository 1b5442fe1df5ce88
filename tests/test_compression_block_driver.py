"""The block pipeline: block by block on GQA decoders, equal to the whole model on its first block, one block's statistics in memory, sweeps."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from compression_helpers import VOCAB, token_batches, token_ids
from svdkit import CompressConfig, compress, load_compressed, save_compressed
from svdkit.calibrate import GramStats
from svdkit.compression.blocks import find_blocks
from svdkit.layers import LowRankLinear
from svdkit.linalg import ParamRatio

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_block_pipeline_runs_on_gqa_decoders_and_keeps_the_tied_head_dense(make_decoder, family):
    model = make_decoder(family, causal=True, tied=True, layers=3)
    assert model.model.layers[0].self_attn.k_proj.out_features < model.model.layers[0].self_attn.k_proj.in_features
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small, report = compress(model, CompressConfig(method="fisher", budget=0.6), token_batches())
    assert report.pipeline == "blocks" and set(report.timings) == {"curvature", "compression"}
    assert all(name.startswith("model.layers.") for name in (row.name for row in report.layers))
    assert report.kept_fraction <= 0.6 + 1e-9
    assert sum(p.numel() for p in small.parameters()) == report.model_params_after
    # the input model is untouched; the head is still the (dense, tied) embedding
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert small.lm_head.weight is small.model.embed_tokens.weight
    assert isinstance(small.model.layers[0].self_attn.k_proj, LowRankLinear) or report.layers[1].rank is None


def test_first_block_of_the_block_pipeline_equals_whole_model_whitening(make_decoder):
    model = make_decoder("llama", causal=True, layers=3)
    batches = token_batches()
    config = dict(method="whiten", rank=4)
    whole, r1 = compress(model, CompressConfig(**config, pipeline="model"), batches)
    blocks, r2 = compress(model, CompressConfig(**config, pipeline="blocks"), batches)
    assert (r1.pipeline, r2.pipeline) == ("model", "blocks")
    for name, module in whole.named_modules():
        if isinstance(module, LowRankLinear) and name.startswith("model.layers.0."):
            other = blocks.get_submodule(name)
            torch.testing.assert_close(other.dense_weight(), module.dense_weight(), rtol=1e-6, atol=1e-7)
    # later blocks see the compressed model's inputs, so they differ
    name = "model.layers.2.mlp.down_proj"
    assert not torch.allclose(whole.get_submodule(name).dense_weight(), blocks.get_submodule(name).dense_weight())


def test_a_one_block_decoder_runs_the_block_pipeline_as_the_whole_model_does(make_decoder):
    model = make_decoder("llama", causal=True, layers=1)
    batches = token_batches()
    whole, _ = compress(model, CompressConfig(method="whiten", rank=4, pipeline="model"), batches)
    blocks, report = compress(model, CompressConfig(method="whiten", rank=4, pipeline="blocks"), batches)
    assert report.pipeline == "blocks" and sum(layer.compressed for layer in report.layers) == 7
    for name, module in whole.named_modules():
        if isinstance(module, LowRankLinear):
            torch.testing.assert_close(blocks.get_submodule(name).dense_weight(), module.dense_weight(), rtol=1e-6, atol=1e-7)


def test_block_pipeline_holds_one_blocks_statistics_whatever_the_depth(make_decoder, monkeypatch):
    """The Gram matrices alive (bytes) when a block has its statistics do not grow with the depth."""
    from svdkit.compression.block_driver import BlockDriver

    alive: weakref.WeakSet = weakref.WeakSet()
    zeros = GramStats.zeros.__func__
    sweep = BlockDriver._sweep
    peak = {"bytes": 0}

    def tracked(cls, dim, device="cpu"):
        stats = zeros(cls, dim, device)
        alive.add(stats.gram)
        return stats

    def measured(*args, **kwargs):
        result = sweep(*args, **kwargs)
        gc.collect()  # count what is alive, not garbage that waits for a collection
        peak["bytes"] = max(peak["bytes"], sum(g.numel() * g.element_size() for g in alive))
        return result

    monkeypatch.setattr(GramStats, "zeros", classmethod(tracked))
    monkeypatch.setattr(BlockDriver, "_sweep", measured)
    peaks = []
    for layers in (2, 6):
        peak["bytes"] = 0
        model = make_decoder("llama", causal=True, layers=layers)
        compress(model, CompressConfig(method="fisher", budget=0.6, pipeline="blocks"), token_batches(n=2))
        peaks.append(peak["bytes"])
    inputs = sum(n * n for n in (64, 64, 64, 112)) * 8  # one block: input Grams (q/k/v share one, gate/up one)
    gradients = sum(n * n for n in (64, 32, 32, 64, 112, 112, 64)) * 8  # its output-gradient Grams
    assert peaks[0] == peaks[1] > 0
    assert peaks[1] <= 2 * (inputs + gradients)


def test_save_load_generate_gives_the_same_tokens(make_decoder, tmp_path):
    model = make_decoder("qwen2", causal=True, tied=True, layers=2)
    small, report = compress(model, CompressConfig(method="whiten", rank=ParamRatio(0.5)), token_batches())
    save_compressed(small, tmp_path / "c", report=report)
    assert (tmp_path / "c" / "config.json").exists()
    again = load_compressed(tmp_path / "c")  # rebuilt from the saved config: no base model at hand
    assert again.lm_head.weight is again.model.embed_tokens.weight
    prompt = token_ids(1, 5, seed=9)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        torch.testing.assert_close(again.generate(prompt, **kwargs), small.generate(prompt, **kwargs), rtol=0, atol=0)
        torch.testing.assert_close(again(prompt).logits, small(prompt).logits)


def test_find_blocks_needs_every_target_inside_one_stack(make_decoder):
    model = make_decoder("llama", causal=True)
    stack = find_blocks(model, ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj"])
    assert stack is not None and stack.name == "model.layers" and len(stack.blocks) == 2
    assert find_blocks(model, ["model.layers.0.mlp.up_proj", "lm_head"]) is None
    with pytest.raises(ValueError, match="pipeline='blocks' needs every target inside one stack"):
        compress(model, CompressConfig(method="whiten", rank=4, pipeline="blocks", include_head=True), token_batches(n=1))


def test_calibration_ids_outside_the_vocabulary_are_refused(make_decoder):
    model = make_decoder("llama", causal=True)
    bad = [torch.full((2, 8), VOCAB + 5)]
    with pytest.raises(ValueError, match=r"calibration batch 0 holds token ids in \[105, 105\].*vocabulary \[0, 100\)"):
        compress(model, CompressConfig(method="whiten", rank=4), bad)


def test_a_block_pipeline_sweep_measures_the_curvature_once_and_equals_separate_runs(make_decoder, monkeypatch):
    from svdkit.compression import compress_sweep
    from svdkit.compression.block_driver import BlockDriver

    model = make_decoder("llama", causal=True, layers=2)
    calls = {"curvature": 0}
    measure = BlockDriver._curvature_pass

    def counted(*args, **kwargs):
        calls["curvature"] += 1
        return measure(*args, **kwargs)

    monkeypatch.setattr(BlockDriver, "_curvature_pass", counted)
    config = CompressConfig(method="fisher", budget=0.5, pipeline="blocks")
    swept = compress_sweep(model, config, [0.4, 0.7], token_batches())
    assert calls["curvature"] == 1
    for budget, (out, report) in zip([0.4, 0.7], swept):
        alone, alone_report = compress(model, CompressConfig(method="fisher", budget=budget, pipeline="blocks"), token_batches())
        assert [r.rank for r in report.layers] == [r.rank for r in alone_report.layers]
        ids = token_ids(1, 12, seed=5)
        with torch.no_grad():
            torch.testing.assert_close(out(ids).logits, alone(ids).logits)

