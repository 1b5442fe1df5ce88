"""Causal language models: token streams, perplexity, block-by-block compression, save -> load -> generate.

Small LLaMA- and Qwen2-shaped models (grouped-query attention, tied embeddings) with random
weights stand in for real LLMs: they test structure and invariants, never quality.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from compression_helpers import VOCAB, token_ids
from svdkit.eval import _windows, perplexity
from svdkit.tokens import calibration_tokens, check_token_ids, evaluation_tokens

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")



# --- perplexity -----------------------------------------------------------------------------------


def test_perplexity_of_one_window_equals_the_models_own_loss(make_decoder):
    model = make_decoder("llama", causal=True)
    ids = token_ids(40)
    result = perplexity(model, ids, seq_len=40)
    with torch.no_grad():
        loss = model(input_ids=ids[None], labels=ids[None]).loss
    assert result.tokens == 39 and result.windows == 1
    assert result.perplexity == pytest.approx(math.exp(float(loss)), rel=1e-5)


def _hand_nll(model, ids: torch.Tensor, context: int) -> tuple[float, int]:
    """Sum of -log p(token t | at most `context` tokens before it), token by token."""
    total, count = 0.0, 0
    with torch.no_grad():
        for t in range(1, len(ids)):
            window = ids[max(0, t - context):t]
            logits = model(input_ids=window[None]).logits[0, -1]
            total -= float(F.log_softmax(logits.double(), -1)[ids[t]])
            count += 1
    return total, count


def test_sliding_window_scores_each_token_once_with_its_context(make_decoder):
    model = make_decoder("qwen2", causal=True)
    ids = token_ids(30, seed=4)
    # stride == seq_len: disjoint windows, each window's first token unscored.
    disjoint = perplexity(model, ids, seq_len=10)
    assert disjoint.tokens == 27 and disjoint.windows == 3
    # stride 1 with a window of 8: token t sees the 7 tokens before it (or all of them early on).
    sliding = perplexity(model, ids, seq_len=8, stride=1, batch_size=5)
    nll, count = _hand_nll(model, ids, context=7)
    assert sliding.tokens == count == 29
    assert sliding.nll == pytest.approx(nll, rel=1e-5)


@pytest.mark.parametrize("total, seq_len, stride", [(10, 4, 4), (10, 4, 2), (17, 5, 3), (5, 8, 8), (2, 2, 1)])
def test_windows_cover_every_token_but_the_first_exactly_once(total, seq_len, stride):
    scored = []
    for begin, end, first in _windows(total, seq_len, stride):
        assert end - begin <= seq_len and first >= 1
        scored.extend(range(begin + first, end))
    assert sorted(scored) == list(range(1, total)) if stride < seq_len or total <= seq_len else len(set(scored)) == len(scored)


def test_perplexity_rejects_bad_input(make_decoder):
    model = make_decoder("llama", causal=True)
    with pytest.raises(ValueError, match="at least two tokens"):
        perplexity(model, torch.tensor([3]))
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, token_ids(20), seq_len=4, stride=5)
    with pytest.raises(ValueError, match="integer tensor"):
        perplexity(model, torch.rand(20))


def test_calibration_windows_are_reproducible_and_cut_from_the_stream():
    stream = torch.arange(1000) % VOCAB
    a = calibration_tokens(stream, n_seqs=6, seq_len=32, seed=3)
    b = calibration_tokens(stream, n_seqs=6, seq_len=32, seed=3)
    c = calibration_tokens(stream, n_seqs=6, seq_len=32, seed=4)
    assert a.shape == (6, 32) and a.dtype == torch.long
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    for row in a:  # every window is a contiguous piece of the stream
        assert torch.equal(torch.diff(row) % VOCAB, torch.ones(31, dtype=torch.long))


def test_token_stream_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="holds 10 tokens, shorter than one sequence of seq_len=16"):
        calibration_tokens(torch.arange(10), n_seqs=2, seq_len=16)
    with pytest.raises(ValueError, match=r"outside the model's vocabulary \[0, 100\)"):
        calibration_tokens(torch.arange(200), n_seqs=2, seq_len=16, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="must be integers"):
        check_token_ids(torch.rand(5), VOCAB, where="x")
    with pytest.raises(ValueError, match="n_seqs must be an int >= 1"):
        calibration_tokens(torch.arange(100), n_seqs=0, seq_len=4)
    bad = tmp_path / "ids.pt"
    torch.save(torch.arange(12).reshape(2, 2, 3), bad)
    with pytest.raises(ValueError, match=r"shape \(2, 2, 3\)"):
        calibration_tokens(bad, n_seqs=1, seq_len=2)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00text")
    with pytest.raises(ValueError, match="binary.txt is not UTF-8"):
        calibration_tokens(binary, tokenizer=object(), n_seqs=1, seq_len=2)
    with pytest.raises(FileNotFoundError, match="no token or text file"):
        evaluation_tokens(tmp_path / "missing.txt")

