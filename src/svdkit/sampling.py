"""Token windows sampled from a causal language model itself (text the model would write).

Healing distils a compressed model toward its dense source on token windows; windows of the
calibration text teach it that text, while windows the dense model writes itself cover whatever
its training taught it (prose, lists, dialogue, code), with no data set to download. This is the
data-free distillation of LLM-QAT (Liu et al., 2023, "LLM-QAT: Data-Free Quantization Aware
Training for Large Language Models"), which trains on the model's own generations.

:func:`sample_windows` starts every window at the model's start-of-text token (its BOS token, or
its end-of-text token where it has none) and samples each next token from the nucleus of the
model's distribution (top-p), with a seeded generator (the global random state is left alone),
reusing the model's key/value cache where it returns one. An end-of-text token inside a window
is kept and sampling goes on (a new document starts), as in the calibration streams.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .batches import output_tensor
from .causal_lm import cache_keyword
from .eval import model_device
from .progress import ProgressLike, track

__all__ = ["sample_windows", "start_token"]


def start_token(source: Any) -> int:
    """The token a generated document starts from: BOS, else end-of-text (the first of several).

    Parameters
    ----------
    source : tokenizer or model config
        Anything with ``bos_token_id`` / ``eos_token_id``.

    Raises
    ------
    ValueError
        It names neither.
    """
    for attribute in ("bos_token_id", "eos_token_id"):
        value = getattr(source, attribute, None)
        if isinstance(value, (list, tuple)) and value:
            value = value[0]
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise ValueError(f"{type(source).__name__} names no BOS or end-of-text token to start generated windows from")


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Probabilities (rows of ``logits``, float32) with the tail outside the top-``p`` nucleus
    set to zero; the most likely token is always kept."""
    probs = torch.softmax(logits.float(), dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
    sorted_probs[before >= top_p] = 0.0
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


@torch.no_grad()
def sample_windows(
    model: nn.Module,
    n_windows: int,
    seq_len: int,
    *,
    start: int,
    seed: int = 0,
    top_p: float = 0.95,
    batch_size: int = 16,
    progress: ProgressLike = None,
) -> torch.Tensor:
    """``n_windows`` windows of ``seq_len`` tokens written by ``model``.

    Parameters
    ----------
    model : nn.Module
        A causal LM with logits of shape (batch, seq, vocab) in its result (a transformers
        ``...ForCausalLM``), called with ``use_cache=True`` and the cache of the step before
        (:func:`svdkit.causal_lm.cache_keyword`); a model whose result holds no cache reruns
        the whole prefix at each step.
    n_windows, seq_len : int
        ``seq_len`` counts the start token.
    start : int
        The first token of every window (:func:`start_token`).
    seed : int
        Seed of the sampling (same seed, model and machine: same windows).
    top_p : float
        Nucleus of each next-token distribution sampled from, in (0, 1].
    batch_size : int
        Windows written together.
    progress : bool or callable

    Returns
    -------
    Tensor of shape (n_windows, seq_len), int64, on the CPU
    """
    for name, value in (("n_windows", n_windows), ("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected a number in (0, 1], got {top_p!r}")
    device, key = model_device(model), cache_keyword(model)
    generator = torch.Generator().manual_seed(int(seed))
    was_training = model.training
    model.eval()
    batches = []
    try:
        for first in track(range(0, n_windows, batch_size), progress, desc="sampling windows"):
            ids = torch.full((min(batch_size, n_windows - first), 1), int(start), dtype=torch.int64)
            cache = None
            while ids.shape[1] < seq_len:
                fed = ids if cache is None else ids[:, -1:]
                result = model(input_ids=fed.to(device), use_cache=True, **{key: cache})
                cache = result.get(key) if isinstance(result, dict) else getattr(result, key, None)
                probs = _nucleus(output_tensor(result)[:, -1].cpu(), top_p)
                if not bool(torch.isfinite(probs).all()):
                    raise ValueError(f"sampling window {first + int((~torch.isfinite(probs)).any(-1).nonzero()[0])}: the model's "
                                     f"next-token distribution after {ids.shape[1]} tokens is NaN or infinite")
                ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
            batches.append(ids)
    finally:
        model.train(was_training)
    return torch.cat(batches)
