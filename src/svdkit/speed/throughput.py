"""How fast causal language models generate: decode tokens per second and prefill time.

:func:`generation_speed` times several models on the same work, interleaved (each round runs
every model once on each workload; the best round counts), so that their ratios hold on a
machine shared with other jobs:

- decode: greedy generation of ``new_tokens`` tokens after a ``prompt_tokens``-token prompt at
  each batch size (tokens per second = batch x new tokens / wall time, the prompt's prefill
  included, as a user sees it);
- prefill: the prompt of ``prefill`` = (batch, length) tokens run through the model with a first
  token generated, as ``generate`` starts (seconds).

The prompts are fixed token ids (the same for every model), so no tokenizer is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .timing import best_times, threads

__all__ = ["GenerationSpeed", "generation_speed", "speed_ratios"]


@dataclass
class GenerationSpeed:
    """One model's speed.

    Attributes
    ----------
    decode : dict of int -> float
        Batch size -> tokens per second.
    prefill : float or None
        Seconds of the prefill.
    settings : dict
        What was measured (new tokens, prompt length, prefill shape, rounds, threads, device).
    """

    decode: dict[int, float] = field(default_factory=dict)
    prefill: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"decode_tokens_per_s": {str(b): v for b, v in self.decode.items()}, "prefill_s": self.prefill, "settings": dict(self.settings)}


def _vocab_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    size = getattr(config, "vocab_size", None)
    if not isinstance(size, int) or size < 2:
        raise ValueError(f"{type(model).__name__} has no config.vocab_size: generation_speed times transformers causal LMs")
    return size


def _generate(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> None:
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, pad_token_id=0)


def generation_speed(
    models: Mapping[str, nn.Module],
    *,
    batches: Sequence[int] = (1, 8),
    new_tokens: int = 32,
    prompt_tokens: int = 64,
    prefill: tuple[int, int] | None = (8, 512),
    rounds: int = 3,
    num_threads: int | None = None,
    device: str | torch.device | None = None,
) -> dict[str, GenerationSpeed]:
    """Decode tokens/s and prefill seconds of each model, timed interleaved.

    Parameters
    ----------
    models : mapping of str -> transformers causal LM
        Every model must share the vocabulary of the first.
    batches : sequence of int
        Decode batch sizes.
    new_tokens, prompt_tokens : int
        Tokens generated greedily after a prompt of this many tokens.
    prefill : (batch, length) or None
        The prefill workload (None: not measured).
    rounds : int
        Rounds; the best time of each model on each workload counts.
    num_threads : int, optional
        CPU threads for the timing (default: as set).
    device : str or torch.device, optional
        Where the models are (default: the first model's parameters' device).

    Returns
    -------
    dict of str -> GenerationSpeed

    Raises
    ------
    ValueError
        No models, a batch size or token count below 1, or a model without ``config.vocab_size``.
    """
    if not models:
        raise ValueError("generation_speed needs at least one model")
    for name, value in (("new_tokens", new_tokens), ("prompt_tokens", prompt_tokens), ("rounds", rounds), *((f"batch {b}", b) for b in batches)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"generation_speed: {name} must be an int >= 1, got {value!r}")
    first = next(iter(models.values()))
    vocab = _vocab_size(first)
    device = torch.device(device) if device is not None else next(first.parameters()).device
    generator = torch.Generator().manual_seed(0)
    settings = {"new_tokens": new_tokens, "prompt_tokens": prompt_tokens, "prefill": list(prefill) if prefill else None,
                "rounds": rounds, "threads": num_threads or torch.get_num_threads(), "device": str(device)}
    out = {name: GenerationSpeed(settings=settings) for name in models}
    with torch.inference_mode(), threads(num_threads):
        for batch in batches:
            ids = torch.randint(1, vocab, (batch, prompt_tokens), generator=generator).to(device)
            best = best_times({name: (lambda m=m: _generate(m, ids, new_tokens)) for name, m in models.items()}, rounds, device=device)
            for name, seconds in best.items():
                out[name].decode[batch] = batch * new_tokens / seconds
        if prefill is not None:
            ids = torch.randint(1, vocab, tuple(prefill), generator=generator).to(device)
            best = best_times({name: (lambda m=m: _generate(m, ids, 1)) for name, m in models.items()}, rounds, device=device)
            for name, seconds in best.items():
                out[name].prefill = seconds
    return out


def speed_ratios(speed: GenerationSpeed, reference: GenerationSpeed) -> dict[str, float]:
    """``speed`` against ``reference``: decode tokens/s ratios per batch (``decode bN x``) and the
    prefill speed-up (``prefill x``, reference time / time); above 1 is faster."""
    ratios = {f"decode b{b} x": speed.decode[b] / reference.decode[b] for b in speed.decode if b in reference.decode}
    if speed.prefill and reference.prefill:
        ratios["prefill x"] = reference.prefill / speed.prefill
    return ratios
