"""Extraction of adapters from fine-tuned weights, and the spectra of weight changes."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from svdkit.linalg import Energy, ErrorTol, layer_seed, truncated_svd, uses_randomized
from svdkit.lora import (
    add_lora,
    analyze_deltas,
    delta_spectrum,
    extract_lora,
    lora_layers,
    weight_deltas,
)
from svdkit.views import weight_matrix


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair():
    """A tiny GPT-2 and a 'fine-tuned' copy whose changes have known ranks (c_fc unchanged)."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0)
    base = GPT2Model(config).eval()
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    ranks = {}
    with torch.no_grad():
        for i, block in enumerate(tuned.h):
            for name, module, r in ((f"h.{i}.attn.c_attn", block.attn.c_attn, 3), (f"h.{i}.attn.c_proj", block.attn.c_proj, 5),
                                    (f"h.{i}.mlp.c_proj", block.mlp.c_proj, 2)):
                out, d = weight_matrix(module).shape
                change = 0.05 * torch.randn(out, r, generator=g) @ torch.randn(r, d, generator=g)
                module.weight.add_(change.T)  # Conv1D stores weight.T
                ranks[name] = r
    return base, tuned, ranks


def _ids():
    return torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(5))


def test_rank_r_change_is_recovered_to_float32_precision(pair):
    base, tuned, ranks = pair
    model, report = extract_lora(base, tuned, r=5)
    deltas = weight_deltas(base, tuned)
    for name, layer in lora_layers(model):
        delta = deltas[name]
        error = float((layer.delta_weight().double() - delta).norm() / delta.norm())
        assert error < 1e-6, (name, error)
    assert {l.name for l in report.layers} == set(ranks)
    assert set(report.unchanged) == {"h.0.mlp.c_fc", "h.1.mlp.c_fc"}
    assert all(l.energy_captured == pytest.approx(1.0, abs=1e-9) for l in report.layers)
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()).last_hidden_state, tuned(_ids()).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_extraction_leaves_both_models_alone(pair):
    base, tuned, _ = pair
    before = {k: v.clone() for k, v in base.state_dict().items()}
    extract_lora(base, tuned, r=2)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    assert not any(isinstance(m, nn.Module) and type(m).__name__.startswith("LoRA") for m in base.modules())


def test_truncated_extraction_reports_energy_and_needed_ranks(pair):
    base, tuned, ranks = pair
    model, report = extract_lora(base, tuned, r=2)
    deltas = weight_deltas(base, tuned)
    for entry in report.layers:
        S = torch.linalg.svdvals(deltas[entry.name])
        kept = float(S[:2].square().sum() / S.square().sum())
        assert entry.rank == 2 and entry.lora_alpha == 2.0
        assert entry.energy_captured == pytest.approx(kept, rel=1e-9)
        assert entry.relative_error == pytest.approx(math.sqrt(1 - kept), abs=1e-7)
        assert entry.rank_99 <= ranks[entry.name] and entry.rank_90 <= entry.rank_99
        curve = torch.cumsum(S.square(), 0) / S.square().sum()
        assert entry.rank_90 == int((curve < 0.9 - 1e-12).sum()) + 1
    assert report.adapter_parameters == sum(2 * (e.shape[0] + e.shape[1]) for e in report.layers)
    assert "energy" in report.to_table()
    assert report.to_dict()["layers"][0]["name"] == report.layers[0].name


def test_energy_and_error_tolerance_specs_pick_ranks_per_layer(pair):
    base, tuned, ranks = pair
    _, full = extract_lora(base, tuned, r=Energy(1 - 1e-9))  # float32 rounding leaves a ~1e-14 tail
    assert {e.name: e.rank for e in full.layers} == ranks
    model, report = extract_lora(base, tuned, r=ErrorTol(0.3))
    for entry in report.layers:
        assert entry.relative_error <= 0.3 + 1e-9
        assert entry.rank <= ranks[entry.name]
    assert report.rank == {"kind": "error_tol", "value": 0.3}
    assert {n: l.rank for n, l in lora_layers(model)} == {e.name: e.rank for e in report.layers}


def test_randomized_extraction_matches_exact(pair):
    base, tuned, _ = pair
    exact, _ = extract_lora(base, tuned, r=5)
    fast, report = extract_lora(base, tuned, r=5, svd_method="randomized")
    for (name, a), (_, b) in zip(lora_layers(exact), lora_layers(fast)):
        torch.testing.assert_close(a.delta_weight(), b.delta_weight(), rtol=0, atol=1e-5)
    assert report.svd_method == "randomized"
    with pytest.raises(ValueError, match="needs each layer's full spectrum"):
        extract_lora(base, tuned, r=Energy(0.9), svd_method="randomized")
    # "auto" (LoRAConfig's value set): randomized where the rank is below a tenth of min(out, d) = 64
    for rank, reference in ((5, fast), (7, extract_lora(base, tuned, r=7, svd_method="exact")[0])):
        auto, auto_report = extract_lora(base, tuned, r=rank, svd_method="auto")
        assert auto_report.svd_method == "auto"
        for (name, a), (_, b) in zip(lora_layers(auto), lora_layers(reference)):
            assert uses_randomized("auto", rank, a.matrix_shape) == (rank == 5), name
            torch.testing.assert_close(a.delta_weight(), b.delta_weight(), rtol=0, atol=0)


def test_randomized_extraction_seeds_layer_i_with_layer_seed(pair):
    base, tuned, _ = pair
    seed = 2**62  # seed * 1_000_003 overflows 64 bits: layer_seed keeps it a valid generator seed
    model, _ = extract_lora(base, tuned, r=3, svd_method="randomized", seed=seed)
    deltas = weight_deltas(base, tuned)
    changed = [name for name, delta in deltas.items() if bool(delta.any())]
    assert [name for name, _ in lora_layers(model)] == changed
    for index, (name, delta) in enumerate(deltas.items()):  # the index counts every selected layer
        if name not in changed:
            continue
        (U, S, Vh), _ = truncated_svd(delta, 3, svd_method="randomized", seed=layer_seed(seed, index))
        layer = model.get_submodule(name)
        torch.testing.assert_close(layer.delta_weight().double(), (U * S) @ Vh, rtol=0, atol=1e-6)


def test_alpha_sets_the_scaling_but_not_the_update(pair):
    base, tuned, _ = pair
    a, _ = extract_lora(base, tuned, r=4)
    b, _ = extract_lora(base, tuned, r=4, lora_alpha=16)
    assert b.h[0].attn.c_attn.scaling == 4.0
    torch.testing.assert_close(a.h[0].attn.c_attn.delta_weight(), b.h[0].attn.c_attn.delta_weight(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"r": 65}, "rank 65 exceeds min\\(out, in\\) = 64 of layer"),
        ({"r": 0}, "r must be >= 1"),
        ({"r": 4, "lora_alpha": 0}, "lora_alpha must be a finite number > 0"),
        ({"r": "16"}, "r must be an int or a rank spec"),
        ({"r": 4, "svd_method": "fast"}, r"svd_method must be one of \('auto', 'exact', 'randomized'\)"),
    ],
)
def test_bad_extraction_arguments(pair, kwargs, match):
    base, tuned, _ = pair
    with pytest.raises(ValueError, match=match):
        extract_lora(base, tuned, **kwargs)


def test_different_architectures_are_refused(pair):
    from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaModel

    base, _, _ = pair
    wider = GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0))
    with pytest.raises(ValueError, match="different architectures: layer 'h.0.attn.c_attn'"):
        extract_lora(base, wider, r=2)
    deeper = GPT2Model(GPT2Config(n_layer=3, n_embd=64, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0))
    with pytest.raises(ValueError, match="only in the fine-tuned model: \\['h.2"):
        extract_lora(base, deeper, r=2)
    llama = LlamaModel(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                   vocab_size=100, bos_token_id=0, eos_token_id=0, pad_token_id=0))
    with pytest.raises(ValueError, match="GPT2Model vs LlamaModel"):
        extract_lora(base, llama, r=2)


def test_identical_models_have_nothing_to_extract(pair):
    base, _, _ = pair
    with pytest.raises(ValueError, match="nothing to extract"):
        extract_lora(base, copy.deepcopy(base), r=2)


def test_models_with_adapters_must_be_merged_first(pair):
    base, tuned, _ = pair
    with pytest.raises(ValueError, match="merge_and_unload"):
        extract_lora(base, add_lora(tuned, ["c_attn"], r=2), r=2)


def test_delta_spectrum_matches_numpy():
    rng = np.random.default_rng(0)
    delta = rng.standard_normal((40, 30)) @ np.diag(np.linspace(2, 0.01, 30)) @ rng.standard_normal((30, 30))
    base = rng.standard_normal((40, 30))
    s = np.linalg.svd(delta, compute_uv=False)
    result = delta_spectrum(torch.from_numpy(delta), name="x", base_weight=torch.from_numpy(base))
    np.testing.assert_allclose(result.singular_values, s, rtol=1e-10)
    for k in (1, 4, 8, 16, 32):
        # error of the best rank-k approximation, computed from the reconstruction itself
        U, S, Vh = np.linalg.svd(delta, full_matrices=False)
        approx = (U[:, :k] * S[:k]) @ Vh[:k]
        expected = np.linalg.norm(delta - approx) / np.linalg.norm(delta)
        assert result.rank_errors[k] == pytest.approx(expected, abs=1e-9)
    assert result.top_energy_share == pytest.approx((s[:10] ** 2).sum() / (s**2).sum())
    assert result.relative_change == pytest.approx(np.linalg.norm(delta) / np.linalg.norm(base))
    assert result.rank_errors[32] == 0.0  # beyond the full rank (30) nothing is lost


def test_analyze_deltas_table(pair):
    base, tuned, ranks = pair
    spectra = analyze_deltas(base, tuned, target_modules=["c_attn", "c_proj"], ranks=(1, 2, 3, 5, 16))
    assert [s.name for s in spectra] == ["h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_proj",
                                         "h.1.attn.c_attn", "h.1.attn.c_proj", "h.1.mlp.c_proj"]
    for s in spectra:
        assert s.rank_99 <= ranks[s.name]
        assert s.rank_errors[ranks[s.name]] < 1e-6
        assert s.top_energy_share == pytest.approx(1.0)
    table = spectra.to_table()
    assert "err@16" in table and "h.1.mlp.c_proj" in table and "r99" in table
    assert spectra[0].to_dict()["rank_errors"]["1"] == spectra[0].rank_errors[1]
