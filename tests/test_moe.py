"""Mixtures of experts: every expert matrix is a target, statistics follow the routing, routers
stay dense, and the compressed model saves, loads and generates like any other."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from svdkit import CompressConfig, compress, load_compressed, save_compressed
from svdkit.analysis import analyze_weights
from svdkit.compression.compressor import Recording
from svdkit.experts import expert_banks
from svdkit.layers.experts import ExpertBank, router_names

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

EXPERTS = 4
COMMON = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              num_experts_per_tok=2, pad_token_id=0, bos_token_id=0, eos_token_id=0)


def mixtral():
    torch.manual_seed(0)
    config = transformers.MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=EXPERTS)
    return transformers.MixtralForCausalLM(config).eval()


def qwen2_moe():
    torch.manual_seed(0)
    config = transformers.Qwen2MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=24,
                                         shared_expert_intermediate_size=40, num_experts=EXPERTS)
    return transformers.Qwen2MoeForCausalLM(config).eval()


def qwen3_moe():
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=24, num_experts=EXPERTS, head_dim=8)
    return transformers.Qwen3MoeForCausalLM(config).eval()


class _LegacyExpert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(32, 40, bias=False), nn.Linear(32, 40, bias=False), nn.Linear(40, 32, bias=False)

    def forward(self, x):
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class _LegacyMoeBlock(nn.Module):
    """The older layout: a router Linear and one module of Linears per expert (top-2)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(32, EXPERTS, bias=False)
        self.experts = nn.ModuleList(_LegacyExpert() for _ in range(EXPERTS))

    def forward(self, hidden):
        flat = hidden.reshape(-1, hidden.shape[-1])
        weights, chosen = torch.topk(torch.softmax(self.gate(flat), dim=-1), 2)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel():
                out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])
        return out.reshape(hidden.shape)


def legacy_mixtral():
    """A LLaMA whose MLPs are replaced by the older one-Linear-per-expert layout."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{k: v for k, v in COMMON.items() if k != "num_experts_per_tok"}, intermediate_size=48)
    model = transformers.LlamaForCausalLM(config).eval()
    for layer in model.model.layers:
        layer.mlp = _LegacyMoeBlock()
    return model


def _batches() -> list[torch.Tensor]:
    return [torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(3)]


FAMILIES = {"mixtral": mixtral, "qwen2_moe": qwen2_moe, "qwen3_moe": qwen3_moe, "legacy": legacy_mixtral}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_expert_matrix_is_compressed_within_the_budget_and_round_trips(family, tmp_path):
    model = FAMILIES[family]()
    out, report = compress(model, CompressConfig(budget=0.7), _batches())
    expert_rows = [row for row in report.layers if row.expert]
    per_expert = 3 if family == "legacy" else 2
    assert len(expert_rows) == per_expert * EXPERTS * 2
    assert not any(name in {row.name for row in report.layers} for name in router_names(model))
    totals = report.totals()
    assert totals["expert_params_before"] == sum(row.params_before for row in expert_rows)
    dense_experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert totals["expert_params_before"] == dense_experts
    one_rank_per_layer = sum(row.shape[0] + row.shape[1] for row in report.layers)
    assert 0.7 * report.target_params_before - one_rank_per_layer <= report.target_params_after <= 0.7 * report.target_params_before
    assert any(row.rank is not None for row in expert_rows)
    assert sum(p.numel() for p in out.parameters()) == report.model_params_after
    # the input model is untouched (its fused experts are folded back)
    assert type(model.model.layers[0].mlp.experts).__name__ != "ExpertBank"
    save_compressed(out, tmp_path / "c", report=report)
    again = load_compressed(tmp_path / "c", base=model if family == "legacy" else None)
    prompt = _batches()[0][:1, :5]
    with torch.no_grad():
        kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        torch.testing.assert_close(again.generate(prompt, **kwargs), out.generate(prompt, **kwargs), rtol=0, atol=0)
        torch.testing.assert_close(again(prompt).logits, out(prompt).logits, rtol=0, atol=0)


def test_a_bank_computes_what_the_fused_module_computes_and_folds_back():
    model = mixtral()
    ids = _batches()[0]
    with torch.no_grad():
        reference = model(ids).logits
        fused = model.model.layers[0].mlp.experts
        with expert_banks(model) as banks:
            assert banks == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
            bank = model.model.layers[0].mlp.experts
            assert isinstance(bank, ExpertBank) and bank[2].down_proj.weight.data_ptr() == fused.down_proj[2].data_ptr()
            torch.testing.assert_close(model(ids).logits, reference, rtol=1e-5, atol=1e-6)
            refolded = bank.to_dense()
            torch.testing.assert_close(refolded.gate_up_proj, fused.gate_up_proj, rtol=0, atol=0)
        assert model.model.layers[0].mlp.experts is fused


@pytest.mark.parametrize("method", ["whiten", "fisher"])
def test_an_experts_statistics_come_from_the_tokens_routed_to_it(method):
    """Expert 1 of layer 0 sees exactly the tokens the router sends it; without gradients (whiten)
    each row is weighed by its routing weight, as the layer's output is; with gradients (fisher)
    the inputs are plain and the weight reaches the output-gradient Gram through the backward pass."""
    model = mixtral()
    block = model.model.layers[0]
    seen = {}

    def keep(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen["x"] = hidden.detach().reshape(-1, 32)

    handle = block.mlp.register_forward_pre_hook(keep, with_kwargs=True)
    ids = _batches()[0]
    with torch.no_grad():
        model(ids)
    handle.remove()
    x = seen["x"].double()
    _, weights, chosen = block.mlp.gate(seen["x"])
    token, slot = torch.where(chosen == 1)
    rows = x[token] * (weights[token, slot, None].double() if method == "whiten" else 1.0)
    with expert_banks(model):
        target = [("model.layers.0.mlp.experts.1.gate_up_proj", model.model.layers[0].mlp.experts[1].gate_up_proj)]
        with torch.no_grad(), Recording(target, gradients=method == "fisher") as recording:
            recording.next_batch(0)
            model(ids)
    stats = recording.inputs[target[0][0]]
    assert stats.count == token.numel()
    torch.testing.assert_close(stats.gram, rows.T @ rows, rtol=1e-5, atol=1e-5)


def test_an_expert_no_token_reaches_is_whitened_by_its_siblings(monkeypatch):
    model = mixtral()
    router = model.model.layers[1].mlp.gate
    router.never = 3  # copies of the model keep the mark
    forward = type(router).forward

    def routed(self, hidden):  # a marked router never picks its expert `never`
        logits, scores, index = forward(self, hidden)
        never = getattr(self, "never", None)
        return logits, scores, index if never is None else torch.where(index == never, (index + 1) % EXPERTS, index)

    monkeypatch.setattr(type(router), "forward", routed)
    out, report = compress(model, CompressConfig(budget=0.7), _batches())
    rows = {row.name: row for row in report.layers}
    starved = rows["model.layers.1.mlp.experts.3.gate_up_proj"]
    assert starved.calibration_tokens == 0 and "no calibration token was routed" in report.to_table()
    assert rows["model.layers.1.mlp.experts.2.gate_up_proj"].calibration_tokens > 0
    # its statistics are its siblings' (finite, so the fisher metric holds) and it weighs nothing
    # in the budget beyond the smallest rank: its errors reach no token
    assert starved.method == "fisher" and starved.rank in (None, 1)
    with torch.no_grad():
        assert torch.isfinite(out(_batches()[0]).logits).all()


def test_routers_stay_dense_and_a_selection_that_reaches_one_is_refused():
    model = qwen2_moe()
    assert router_names(model) == {"model.layers.0.mlp.shared_expert_gate", "model.layers.1.mlp.shared_expert_gate"}
    with pytest.raises(ValueError, match=r"selects the mixture-of-experts router model\.layers\.0\.mlp\.shared_expert_gate.*list it by name"):
        compress(model, CompressConfig(budget=0.7, target_modules=r".*mlp.*"), _batches())
    _, report = compress(model, CompressConfig(method="whiten", rank=1, target_modules=["shared_expert_gate"]), _batches())
    assert {row.name for row in report.layers} == {"model.layers.0.mlp.shared_expert_gate", "model.layers.1.mlp.shared_expert_gate"}
    legacy = legacy_mixtral()
    assert router_names(legacy) == {"model.layers.0.mlp.gate", "model.layers.1.mlp.gate"}


def test_a_rank_pattern_naming_an_expert_that_does_not_exist_is_an_error():
    with pytest.raises(ValueError, match=r"rank_pattern: 1 key\(s\) match none .*'experts\.9\.down_proj' \(did you mean 'experts\.\d\.down_proj'"):
        compress(mixtral(), CompressConfig(budget=0.7, rank_pattern={"experts.9.down_proj": 4}), _batches())
    _, report = compress(mixtral(), CompressConfig(budget=0.7, rank_pattern={"layers.0.mlp.experts.2.down_proj": 4}), _batches())
    assert {row.name: row.rank for row in report.layers}["model.layers.0.mlp.experts.2.down_proj"] == 4


class _TransposedExperts(nn.Module):
    """Experts stored transposed, (E, H, 2I) and (E, I, H), as some models keep them."""

    is_transposed = True

    def __init__(self, fused: nn.Module) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(fused.gate_up_proj.detach().transpose(1, 2).clone())
        self.down_proj = nn.Parameter(fused.down_proj.detach().transpose(1, 2).clone())

    def forward(self, hidden, index, weights):
        out = torch.zeros_like(hidden)
        for e in range(self.gate_up_proj.shape[0]):
            token, slot = torch.where(index == e)
            gate, up = (hidden[token] @ self.gate_up_proj[e]).chunk(2, dim=-1)
            out.index_add_(0, token, (nn.functional.silu(gate) * up) @ self.down_proj[e] * weights[token, slot, None])
        return out


def test_experts_of_an_unknown_layout_are_named_with_what_svdkit_can_do():
    model = mixtral()
    model.model.layers[0].mlp.experts = _TransposedExperts(model.model.layers[0].mlp.experts)
    with pytest.raises(TypeError, match=r"model\.layers\.0\.mlp\.experts: _TransposedExperts stores its experts as is_transposed=True.*exclude it"):
        compress(model, CompressConfig(budget=0.7), _batches())
    _, report = compress(model, CompressConfig(budget=0.7, exclude_modules=["model.layers.0.mlp.experts"]), _batches())
    assert not any(row.name.startswith("model.layers.0.mlp.experts") for row in report.layers)


def test_the_analysis_table_has_a_row_per_expert_matrix():
    table = analyze_weights(mixtral(), error=None)
    names = {record["name"] for record in table.records}
    assert {f"model.layers.1.mlp.experts.{e}.{p}" for e in range(EXPERTS) for p in ("gate_up_proj", "down_proj")} <= names


def test_a_mixture_streams_block_by_block_from_a_checkpoint_of_its_own_names(tmp_path):
    """A checkpoint whose tensors carry the model's own names (fused experts) streams; one that
    transformers writes under its older per-expert names is refused before any work."""
    from safetensors.torch import save_file

    from svdkit.compression import compress_to_directory

    model = mixtral()
    reference, reference_report = compress(model, CompressConfig(budget=0.7), _batches())
    own = tmp_path / "own"
    own.mkdir()
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(own)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(own / "model.safetensors"), metadata={"format": "pt"})
    report = compress_to_directory(own, tmp_path / "out", CompressConfig(budget=0.7), _batches())
    assert [r.rank for r in report.layers] == [r.rank for r in reference_report.layers]
    again = load_compressed(tmp_path / "out")
    ids = _batches()[1]
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, reference(ids).logits, rtol=1e-6, atol=1e-6)
    model.save_pretrained(tmp_path / "renamed")  # transformers writes block_sparse_moe.experts.0.w1.weight ...
    with pytest.raises(ValueError, match=r"lacks \d+ tensor\(s\): .*holds tensors the model has no parameter for, e\.g\. .*block_sparse_moe.*without --stream"):
        compress_to_directory(tmp_path / "renamed", tmp_path / "out2", CompressConfig(budget=0.7), _batches())


def _experts_sharing_a_basis(model, rank: int = 6):
    """Experts built as one rank-``rank`` right factor times per-expert left factors, plus a little
    noise: what a shared basis captures with fewer parameters than per-expert factors."""
    g = torch.Generator().manual_seed(5)
    for layer in model.model.layers:
        fused = layer.mlp.experts
        with torch.no_grad():
            for name in ("gate_up_proj", "down_proj"):
                weight = getattr(fused, name)
                experts, m, n = weight.shape
                shared = torch.randn(rank, n, generator=g)
                for e in range(experts):
                    weight[e] = torch.randn(m, rank, generator=g) @ shared / n ** 0.5 + 1e-3 * torch.randn(m, n, generator=g)
    return model


@pytest.mark.parametrize("pipeline", ["blocks", "model"])
def test_a_shared_basis_is_taken_where_it_leaves_less_error_at_equal_parameters(pipeline, tmp_path):
    model = _experts_sharing_a_basis(mixtral())
    config = CompressConfig(budget=0.6, expert_basis="shared", pipeline=pipeline)
    out, report = compress(model, config, _batches())
    shared = [row for row in report.layers if "+shared-" in row.method]
    assert shared and all("error" in row.skip_reason for row in shared)
    # equal parameters: what the report counts is what the model holds, the shared factor once
    assert sum(p.numel() for p in out.parameters()) == report.model_params_after
    assert report.target_params_after <= 0.6 * report.target_params_before
    container, _, projection = shared[0].name.rpartition(".0.")
    side = "v" if "shared-right" in shared[0].method else "u"
    factors = {id(getattr(out.get_submodule(f"{container}.{e}.{projection}"), side)) for e in range(EXPERTS)}
    assert len(factors) == 1  # one tensor, shared by the layer's experts
    save_compressed(out, tmp_path / "c", report=report)
    again = load_compressed(tmp_path / "c")
    ids = _batches()[1]
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, out(ids).logits, rtol=0, atol=0)
    # the same experts factorized one by one: more error on the data at the same budget
    separate, _ = compress(model, CompressConfig(budget=0.6, pipeline=pipeline), _batches())
    with torch.no_grad():
        reference = model(ids).logits
        assert (out(ids).logits - reference).norm() < (separate(ids).logits - reference).norm()



def test_a_compressed_mixture_loads_in_plain_transformers_without_svdkit(tmp_path):
    """The export unfolds the fused experts into the modeling file's own ExpertBank before the
    factors are read: the same logits and tokens as svdkit's loader, in a process without svdkit."""
    import json
    import os
    import subprocess
    import sys

    model = mixtral()
    out, report = compress(model, CompressConfig(budget=0.7), _batches())
    save_compressed(out, tmp_path / "moe", report=report)
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["model_type"] == "svdkit_mixtral" and config["svdkit"]["expert_banks"]
    ids = _batches()[2]
    with torch.no_grad():
        torch.save({"ids": ids, "logits": out(ids).logits, "tokens": out.generate(ids[:1, :4], max_new_tokens=6, do_sample=False)},
                   tmp_path / "expected.pt")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf-modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    check = subprocess.run([sys.executable, "-I", "-c", _PLAIN_MOE, str(tmp_path / "moe"), str(tmp_path / "expected.pt")],
                           cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-3000:]
    assert "same logits and tokens" in check.stdout


_PLAIN_MOE = """
import importlib.util, os, sys
sys.path[:] = [p for p in sys.path if p and not os.path.isdir(os.path.join(p, "svdkit"))]
sys.meta_path[:] = [finder for finder in sys.meta_path if "svdkit" not in repr(finder).lower()]
assert importlib.util.find_spec('svdkit') is None
import torch, transformers
directory, expected = sys.argv[1], torch.load(sys.argv[2])
model = transformers.AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
assert type(model.model.layers[0].mlp.experts).__name__ == 'ExpertBank'
with torch.no_grad():
    logits = model(expected['ids']).logits
    tokens = model.generate(expected['ids'][:1, :4], max_new_tokens=6, do_sample=False)
assert (logits - expected['logits']).abs().max() <= 1e-6 * expected['logits'].abs().max(), (logits - expected['logits']).abs().max()
assert torch.equal(tokens, expected['tokens'])
print('same logits and tokens')
"""
