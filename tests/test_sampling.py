"""Windows sampled from a causal LM (svdkit.sampling): the nucleus against a numpy reference,
greedy sampling against transformers' own greedy generation, the first-token frequencies against
the model's distribution, and the key/value cache against rerunning the prefix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from svdkit.sampling import _nucleus, sample_windows, start_token

from conftest import tiny_causal_lm

START = 5  # not the tiny models' padding token 0, whose embedding is zero (every logit equal)


def _numpy_nucleus(logits: np.ndarray, top_p: float) -> np.ndarray:
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    kept = np.zeros_like(probs)
    mass = 0.0
    for token in order:  # keep tokens until the ones before reach top_p
        if mass >= top_p:
            break
        kept[token] = probs[token]
        mass += probs[token]
    return kept


@settings(max_examples=40, deadline=None)
@given(vocab=st.integers(2, 50), top_p=st.floats(0.01, 1.0), seed=st.integers(0, 10_000))
def test_the_nucleus_keeps_the_most_likely_tokens_up_to_top_p(vocab, top_p, seed):
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3
    ours = _nucleus(logits.unsqueeze(0), top_p)[0].double().numpy()
    np.testing.assert_allclose(ours, _numpy_nucleus(logits.numpy(), top_p), atol=1e-6)
    assert ours.argmax() == logits.argmax()


def test_greedy_sampling_is_transformers_greedy_generation():
    model = tiny_causal_lm("llama")
    model.generation_config.eos_token_id = None  # sampling goes on past an end-of-text token; so must generate
    ours = sample_windows(model, 3, 12, start=START, top_p=1e-9, batch_size=2)
    theirs = model.generate(torch.full((3, 1), START), attention_mask=torch.ones(3, 1, dtype=torch.int64),
                            do_sample=False, max_new_tokens=11)
    assert torch.equal(ours, theirs)


def test_first_tokens_follow_the_models_distribution():
    model = tiny_causal_lm("llama")
    n = 3000
    first = sample_windows(model, n, 2, start=START, top_p=1.0, batch_size=1000, seed=3)[:, 1]
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([[START]])).logits[0, -1].double(), -1)
    counts = torch.bincount(first, minlength=probs.numel()).double()
    # every token's count within 5 standard deviations of its binomial mean
    assert torch.all((counts - n * probs).abs() <= 5 * (n * probs * (1 - probs)).sqrt() + 1)


class _NoCache(torch.nn.Module):
    """The same model, returning no key/value cache (each step reruns the prefix)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, past_key_values=None, use_cache=False):
        return self.model(input_ids=input_ids, use_cache=False).logits


def test_the_cache_gives_the_windows_of_rerunning_the_prefix_and_seeds_repeat():
    model = tiny_causal_lm("llama")
    cached = sample_windows(model, 5, 16, start=START, seed=7, batch_size=3)
    assert cached.shape == (5, 16) and cached.dtype == torch.int64 and torch.all(cached[:, 0] == START)
    assert torch.equal(cached, sample_windows(_NoCache(model).eval(), 5, 16, start=START, seed=7, batch_size=3))
    assert torch.equal(cached, sample_windows(model, 5, 16, start=START, seed=7, batch_size=3))
    assert not torch.equal(cached, sample_windows(model, 5, 16, start=START, seed=8, batch_size=3))
    assert model.training is False


def test_bad_arguments_and_tokenizers_without_a_start_token_are_refused():
    model = tiny_causal_lm("llama")
    for kwargs, match in ((dict(n_windows=0, seq_len=4), "n_windows"), (dict(n_windows=1, seq_len=4, top_p=0.0), "top_p"),
                          (dict(n_windows=1, seq_len=4, batch_size=True), "batch_size")):
        with pytest.raises(ValueError, match=match):
            sample_windows(model, start=0, **kwargs)

    class Bare:
        bos_token_id = None
        eos_token_id = None

    class EndOnly:
        bos_token_id = None
        eos_token_id = 5

    with pytest.raises(ValueError, match="names no BOS or end-of-text token"):
        start_token(Bare())
    assert start_token(EndOnly()) == 5
    EndOnly.eos_token_id = [7, 8]  # several end-of-text tokens (LLaMA 3): the first
    assert start_token(EndOnly()) == 7
