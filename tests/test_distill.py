"""Healing a compressed causal LM by distillation (svdkit.compression.distill, ``svdkit heal``):
a tiny random LLaMA, its compressed copy, windows of real text through a small tokenizer."""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch

from svdkit import CompressConfig, compress, load_compressed, save_compressed
from svdkit.cli import main
from svdkit.compression.distill import HealConfig, check_heal_source, heal_language_model, healed_parameters, mean_kl
from svdkit.linalg import ParamRatio
from svdkit.sampling import sample_windows, start_token

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


def _windows(n: int = 12, length: int = 32, vocab: int = 300, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def pair(make_decoder):
    """A tiny dense LLaMA and a copy compressed to a third of its blocks' parameters (plain SVD: far from the dense one)."""
    dense = make_decoder("llama", causal=True, tied=True, layers=2, vocab=300).eval()
    compressed, _ = compress(dense, CompressConfig(method="svd", rank=ParamRatio(0.35)))
    return dense, compressed


def test_healing_lowers_the_held_out_kl_and_trains_only_the_factors(pair):
    dense, compressed = pair
    student = copy.deepcopy(compressed)
    windows = _windows(64)
    untouched = {k: v.clone() for k, v in student.state_dict().items() if ".u" not in k and ".v" not in k}
    dense_state = {k: v.clone() for k, v in dense.state_dict().items()}
    result = heal_language_model(student, dense, windows, HealConfig(steps=30, lr=3e-3, batch_windows=4, held_out=8))
    assert result.held_out_kl_after < 0.8 * result.held_out_kl_before  # 0.0047 -> 0.0031 when written
    # the held-out figure is measured independently: mean_kl on the same held-out windows
    assert result.held_out_kl_after == pytest.approx(mean_kl(student, dense, windows[-8:]), rel=1e-5)
    assert result.steps == 30 and result.tokens == 30 * 4 * 32 and len(result.losses) == 30
    for key, value in student.state_dict().items():  # embedding, norms, biases: as they were
        if key in untouched:
            assert torch.equal(value, untouched[key]), key
    assert all(torch.equal(v, dense_state[k]) for k, v in dense.state_dict().items())  # the teacher is left alone
    assert all(p.grad is None for p in student.parameters()) and all(p.requires_grad for p in student.parameters())
    names = [name for name, _ in healed_parameters(student)]
    assert names and all(name.rsplit(".", 1)[-1] in ("u", "v", "bias") for name in names)


def test_the_kl_is_the_textbook_one():
    # against an independent computation: KL(p || q) = sum p log(p / q) per position, averaged
    student, teacher = torch.nn.Linear(3, 5), torch.nn.Linear(3, 5)

    class Wrap(torch.nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.emb, self.lin = torch.nn.Embedding(7, 3), lin

        def forward(self, input_ids, use_cache=False):
            return {"logits": self.lin(self.emb(input_ids))}

    torch.manual_seed(0)
    s, t = Wrap(student), Wrap(teacher)
    ids = torch.randint(0, 7, (2, 6))
    with torch.no_grad():
        p = torch.softmax(t(ids)["logits"], -1).double()
        q = torch.softmax(s(ids)["logits"], -1).double()
    expected = float((p * (p / q).log()).sum(-1).mean())
    assert mean_kl(s, t, ids) == pytest.approx(expected, rel=1e-5)


def test_an_interrupted_healing_resumes_to_the_same_result(pair, tmp_path, monkeypatch):
    dense, compressed = pair
    windows = _windows()
    # three more training windows written by the dense model itself
    config = HealConfig(steps=6, lr=3e-3, batch_windows=2, held_out=4, checkpoint_every=3, generated_windows=3, seed=2)
    straight = copy.deepcopy(compressed)
    expected = heal_language_model(straight, dense, windows, config, state_path=tmp_path / "a.safetensors")
    assert (expected.train_windows, expected.generated_windows) == (8 + 3, 3) and expected.generation_seconds > 0
    assert "3 of 11 windows written by the dense model" in expected.summary()

    class Interrupt(Exception):
        pass

    def stop_after_four(iterable, desc, total):
        for i, item in enumerate(iterable):
            if i == 4:
                raise Interrupt
            yield item

    resumed = copy.deepcopy(compressed)
    state = tmp_path / "b.safetensors"
    with pytest.raises(Interrupt):
        heal_language_model(resumed, dense, windows, config, state_path=state, progress=stop_after_four)
    assert state.exists()  # written at step 3; step 4's work is lost and redone
    from safetensors import safe_open

    with safe_open(str(state), framework="pt") as handle:  # the state keeps the windows the dense model wrote
        kept = handle.get_tensor("generated")
    assert torch.equal(kept, sample_windows(dense, 3, 32, start=start_token(dense.config), seed=2))
    again = copy.deepcopy(compressed)  # a new process would start from the saved model, not from the half-trained one

    def no_sampling(*args, **kwargs):
        raise AssertionError("a resumed run samples its windows again")

    monkeypatch.setattr("svdkit.compression.distill.sample_windows", no_sampling)
    began = time.perf_counter()
    result = heal_language_model(again, dense, windows, config, state_path=state)
    resumed_seconds = time.perf_counter() - began
    assert result.resumed_from == 3 and result.losses[:3] == expected.losses[:3] and result.generated_windows == 3
    # the time before the interruption counts: the state file recorded it, sampling included
    assert result.seconds > resumed_seconds and result.generation_seconds > 0
    assert result.losses == pytest.approx(expected.losses, rel=1e-5, abs=1e-7)
    for (name, a), (_, b) in zip(healed_parameters(straight), healed_parameters(again)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="written for other windows"):
        heal_language_model(copy.deepcopy(compressed), dense, _windows(seed=5), config, state_path=state)


def test_a_healed_model_saves_and_loads_like_any_compressed_model(pair, tmp_path):
    dense, compressed = pair
    student = copy.deepcopy(compressed)
    heal_language_model(student, dense, _windows(), HealConfig(steps=3, lr=3e-3, batch_windows=2, held_out=4))
    save_compressed(student, tmp_path / "healed")
    loaded = load_compressed(tmp_path / "healed")
    ids = _windows(2)
    torch.testing.assert_close(loaded(input_ids=ids).logits, student(input_ids=ids).logits)


def test_a_dense_model_that_is_not_the_source_is_refused(pair, make_decoder):
    dense, compressed = pair
    assert check_heal_source(compressed, dense) > 0
    other = make_decoder("llama", causal=True, tied=True, layers=2, vocab=300, seed=7)
    with pytest.raises(ValueError, match="not the one this model was compressed from"):
        check_heal_source(compressed, other, source="tiny")
    with pytest.raises(ValueError, match="no factorized layers"):
        heal_language_model(copy.deepcopy(dense), dense, _windows())


def test_heal_config_is_validated():
    for bad in ({"steps": 0}, {"lr": 0.0}, {"held_out": 0}, {"ce_weight": -1.0}, {"temperature": float("nan")},
                {"generated_windows": -1}):
        with pytest.raises(ValueError, match="HealConfig"):
            HealConfig(**bad)


def test_svdkit_heal_heals_a_compressed_directory_and_refuses_bad_inputs(lm_dir, tmp_path, capsys):
    out = tmp_path / "small"
    # compressed on a calibration mix, healed right away for 2 steps, then healed again by svdkit heal
    assert main(["compress", str(lm_dir), "-o", str(out), "--params", "0.5", "--calib-seqs", "8", "--seq-len", "32",
                 "--batch-size", "4", "--calib", "stdlib+stdlib-odd", "--heal-steps", "2", "--no-eval", "--no-progress",
                 "--json", str(tmp_path / "c.json")]) == 0
    compressed = json.loads((tmp_path / "c.json").read_text())
    assert compressed["quality"]["healing"].startswith("healed 2 steps") and "healing" in compressed["totals"]["timings"]
    healed = tmp_path / "healed"
    assert main(["heal", str(out), "-o", str(healed), "--steps", "4", "--lr", "1e-3", "--windows", "8", "--held-out", "2",
                 "--seq-len", "32", "--batch-windows", "2", "--generated", "3", "--no-eval", "--no-progress",
                 "--json", str(tmp_path / "h.json")]) == 0
    record = json.loads((tmp_path / "h.json").read_text())
    assert record["steps"] == 4 and record["tokens"] == 4 * 2 * 32 and record["held_out_kl_before"] > 0  # lowering it: the test above
    assert (record["generated_windows"], record["train_windows"]) == (3, 8 + 3) and record["config"]["generated_windows"] == 3
    description = json.loads((healed / "svdkit_compressed.json").read_text())
    assert description["report"]["healing"]["steps"] == 4 and description["source"] == str(lm_dir.resolve())
    assert not (tmp_path / "healed.heal-state.safetensors").exists()
    from svdkit.models import load_model

    assert load_model(str(healed)).is_causal_lm
    # not a compressed LM
    assert main(["heal", str(lm_dir), "--steps", "1", "--no-eval"]) == 1
    assert "svdkit_compressed.json" in capsys.readouterr().err
    # a dense model that is not the source
    other = tmp_path / "other"
    from conftest import build_decoder

    build_decoder("llama", causal=True, tied=True, layers=2, vocab=300, seed=3).save_pretrained(other)
    assert main(["heal", str(out), "-o", str(tmp_path / "x"), "--dense", str(other), "--steps", "1", "--no-eval"]) == 1
    assert "not the one this model was compressed from" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["heal", str(out), "-o", str(tmp_path / "y"), "--generated", "-1", "--steps", "1", "--no-eval"]) == 1
    assert "--generated must be >= 0" in capsys.readouterr().err
