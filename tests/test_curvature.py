"""The curvature estimates: what each one's gradients estimate, and which one a model gets.

- ``labels``: the gradient at the logits is ``p - e_y`` for the true next token ``y`` (the
  empirical Fisher's factor);
- ``sampled``: over next tokens drawn from the model, the mean outer product of the gradient at
  the logits is the true Fisher ``diag(p) - p p^T`` of each position (checked by Monte Carlo);
- ``auto``: ``labels`` for causal LMs, random probes otherwise; each estimate's own number of
  objectives (one sampled token per position, two random probes) unless ``probes`` is given.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from svdkit.compression import CompressConfig, compress
from svdkit.compression.curvature import CURVATURES, objectives, resolve_curvature

from conftest import tiny_causal_lm


def _logit_gradients(name: str, logits: torch.Tensor, ids: torch.Tensor, probes: int, seed: int) -> torch.Tensor:
    """The gradient of each objective of estimate ``name`` at the logits, shape (probes, B, T, V)."""
    logits = logits.clone().requires_grad_(True)
    return torch.stack([torch.autograd.grad(objective, logits)[0]
                        for objective in objectives(name, logits, ids, probes, torch.Generator().manual_seed(seed))])


@settings(max_examples=5, deadline=None)
@given(vocab=st.integers(2, 6), length=st.integers(2, 4), scale=st.floats(0.1, 3.0), seed=st.integers(0, 2**16))
def test_sampled_tokens_give_the_true_fisher_at_the_logits(vocab, length, scale, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, length, vocab, generator=g, dtype=torch.float64) * scale
    ids = torch.randint(0, vocab, (2, length), generator=g)
    draws = 1000
    grads = _logit_gradients("sampled", logits, ids, draws, seed)[:, :, :-1]  # the last position predicts nothing
    p = torch.softmax(logits[:, :-1], dim=-1).numpy()
    samples = grads.numpy()  # (draws, B, T-1, V): p - e_y for a drawn y (softmax in float32)
    np.testing.assert_allclose(samples.sum(-1), 0, atol=1e-6)
    assert np.all((samples < -1e-7).sum(-1) <= 1)
    mean = np.einsum("nbti,nbtj->btij", samples, samples) / draws
    # the exact law of one draw, by enumerating the vocabulary: y ~ p, outer (p - e_y)(p - e_y)^T
    eye = np.eye(vocab)
    outers = np.einsum("btyi,btyj->btyij", p[:, :, None] - eye, p[:, :, None] - eye)
    fisher = np.einsum("bty,btyij->btij", p, outers)
    np.testing.assert_allclose(fisher, np.einsum("bti,ij->btij", p, eye) - np.einsum("bti,btj->btij", p, p), atol=1e-12)
    sd = np.sqrt(np.einsum("bty,btyij->btij", p, (outers - fisher[:, :, None]) ** 2) / draws)
    assert np.all(np.abs(mean - fisher) <= 5 * sd + 1e-6)


def test_labels_give_p_minus_the_true_token_at_the_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    (grad,) = _logit_gradients("labels", logits, ids, 1, 0)
    expected = torch.softmax(logits[:, :-1], dim=-1) - torch.nn.functional.one_hot(ids[:, 1:], 7)
    torch.testing.assert_close(grad[:, :-1], expected)
    assert torch.all(grad[:, -1] == 0)


def test_sampled_draws_repeat_with_the_generator_and_differ_with_its_seed():
    logits = torch.randn(1, 9, 11, dtype=torch.float64)
    ids = torch.zeros(1, 9, dtype=torch.long)
    first, again, other = (_logit_gradients("sampled", logits, ids, 3, seed) for seed in (4, 4, 5))
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize("probes", [None, 3])
def test_the_sampled_fisher_costs_one_backward_pass_per_window_unless_told(probes, monkeypatch):
    """One sampled token per position by default: the labels' cost (an explicit count is honoured)."""
    model = tiny_causal_lm("llama")
    assert resolve_curvature("auto", model) == "labels" and resolve_curvature("auto", torch.nn.Linear(2, 2)) == "probes"
    assert (CURVATURES["sampled"].default_probes, CURVATURES["probes"].default_probes) == (1, 2)
    counts = []
    original = CURVATURES["sampled"]

    def counted(result, batch, n, generator):
        counts.append(n)
        return original.objectives(result, batch, n, generator)

    monkeypatch.setitem(CURVATURES, "sampled", dataclasses.replace(original, objectives=counted))
    batches = [torch.randint(1, 50, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    compress(model, CompressConfig(budget=0.7, curvature="sampled", probes=probes, gradient_batches=2, speed_aware="off"), batches)
    assert counts and set(counts) == {probes or 1}


def test_a_config_without_probes_round_trips_and_bad_counts_are_refused():
    config = CompressConfig(budget=0.8)
    assert config.probes is None and CompressConfig.from_dict(config.to_dict()) == config
    assert CompressConfig.from_dict(CompressConfig(budget=0.8, probes=4).to_dict()).probes == 4
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="probes: expected an int >= 1"):
            CompressConfig(budget=0.8, probes=bad)
