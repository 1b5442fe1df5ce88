"""Quality of a model as the field measures it: perplexity for causal language models.

Perplexity is ``exp`` of the mean negative log-likelihood of each token given the tokens before
it. A model with a bounded context reads a long text in windows of ``seq_len`` tokens that start
every ``stride`` tokens (the standard sliding window, as in the transformers guide "Perplexity of
fixed-length models"); each token is scored once, in the first window where it is not a
context-only token, so with ``stride == seq_len`` (the default, and SVD-LLM's protocol) the text
is cut into disjoint windows and the first token of each window is not scored, and with a
smaller stride every token but the very first is scored with at least ``seq_len - stride``
tokens of context.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .batches import output_tensor
from .progress import ProgressLike, track

__all__ = [
    "DEFAULT_SEQ_LEN", "PerplexityResult", "greedy_continuation", "language_model_quality", "model_device", "model_logits",
    "perplexity", "worst_ratio",
]

#: The window of :func:`perplexity` when none is given (shortened to the model's context).
DEFAULT_SEQ_LEN = 512


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity of a model on a token stream.

    Attributes
    ----------
    perplexity : float
        ``exp(nll / tokens)``.
    nll : float
        Summed negative log-likelihood (nats) of the scored tokens.
    tokens : int
        Number of scored tokens.
    windows : int
        Number of model calls' windows.
    """

    perplexity: float
    nll: float
    tokens: int
    windows: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _windows(total: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position within the window) for each window."""
    windows = []
    scored_until = 1  # token 0 has no context
    begin = 0
    while scored_until < total:
        end = min(begin + seq_len, total)
        first = max(scored_until - begin, 1)
        if first < end - begin:
            windows.append((begin, end, first))
        scored_until = end
        if end == total:
            break
        begin += stride
    return windows


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter that is not on the meta device (CPU if none)."""
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def model_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``model(input_ids=ids)``'s logits, of shape (batch, seq, vocab); a clear error if it gives none."""
    out = model(input_ids=ids, use_cache=False)
    try:
        logits = output_tensor(out)  # svdkit's one rule for the tensor a forward result stands for
    except TypeError:
        logits = None
    if logits is None or logits.ndim != 3:
        raise TypeError(
            f"{type(model).__name__} did not return logits of shape (batch, seq, vocab): scoring text needs a causal "
            "language model (e.g. a transformers ...ForCausalLM)"
        )
    return logits


def perplexity(
    model: nn.Module,
    token_ids: torch.Tensor,
    *,
    seq_len: int | None = None,
    stride: int | None = None,
    batch_size: int = 4,
    progress: ProgressLike = False,
) -> PerplexityResult:
    """Perplexity of a causal language model on a token stream (see the module docstring).

    Parameters
    ----------
    model : nn.Module
        Called as ``model(input_ids=ids)``; its result has ``.logits`` of shape
        (batch, seq, vocab) (a transformers ``...ForCausalLM``). Run in eval mode without
        gradients; its training flag is restored.
    token_ids : Tensor of shape (T,) or (N, L)
        One stream, or N sequences that are scored independently (then ``seq_len`` and
        ``stride`` apply to each).
    seq_len : int, optional
        Window length, at most the model's context (``config.max_position_embeddings`` when the
        model has one). Default: 512, or the model's context if it is shorter.
    stride : int, optional
        Step between window starts; defaults to ``seq_len`` (disjoint windows).
    batch_size : int
        Windows per model call.
    progress : bool or callable
        See :mod:`svdkit.progress`.

    Returns
    -------
    PerplexityResult

    Raises
    ------
    ValueError
        Bad sizes, a window longer than the model's context, non-integer ids, a stream with fewer
        than two tokens, or non-finite logits (the message names the window).
    """
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    context = context if isinstance(context, int) and not isinstance(context, bool) and context > 0 else None
    seq_len = min(DEFAULT_SEQ_LEN, context or DEFAULT_SEQ_LEN) if seq_len is None else seq_len
    stride = seq_len if stride is None else stride
    for name, value in (("seq_len", seq_len), ("stride", stride), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (one token of context and one to predict), got {seq_len}")
    if stride > seq_len:
        raise ValueError(f"stride ({stride}) larger than seq_len ({seq_len}) would leave tokens unscored")
    if context is not None and seq_len > context:
        raise ValueError(
            f"seq_len {seq_len} is longer than the model's context ({context} tokens, its config's max_position_embeddings): "
            f"the positions past it were never trained; pass seq_len <= {context}"
        )
    if not isinstance(token_ids, torch.Tensor) or token_ids.is_floating_point() or token_ids.ndim not in (1, 2):
        raise ValueError("token_ids must be an integer tensor of shape (T,) or (N, L)")
    streams = [token_ids] if token_ids.ndim == 1 else list(token_ids)
    jobs = [(s, w) for s in streams for w in _windows(s.numel(), seq_len, stride)]
    if not jobs:
        raise ValueError(f"cannot score a stream of {streams[0].numel()} token(s): perplexity needs at least two tokens")
    # Windows of one length go together; the last window of a stream may be shorter.
    jobs.sort(key=lambda job: job[1][1] - job[1][0], reverse=True)
    batches = [jobs[i:i + batch_size] for i in range(0, len(jobs), batch_size)]
    device = model_device(model)
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        with torch.no_grad():
            for batch in track(batches, progress, desc="perplexity windows"):
                groups: dict[int, list] = {}
                for job in batch:
                    groups.setdefault(job[1][1] - job[1][0], []).append(job)
                for size, group in groups.items():
                    ids = torch.stack([s[begin:end] for s, (begin, end, _) in group]).to(device)
                    logits = model_logits(model, ids)[:, :-1].float()
                    targets = ids[:, 1:].clone()
                    for row, (_, (_, _, first)) in enumerate(group):
                        targets[row, : first - 1] = -100
                    if not bool(torch.isfinite(logits).all()):
                        begin = group[0][1][0]
                        raise ValueError(f"the model produced non-finite logits on the window starting at token {begin}")
                    nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"))
                    count += int((targets != -100).sum())
    finally:
        model.train(was_training)
    return PerplexityResult(perplexity=math.exp(nll / count), nll=nll, tokens=count, windows=len(jobs))


def greedy_continuation(model: nn.Module, tokenizer: Any, prompt: str, *, max_new_tokens: int = 24) -> str:
    """The model's greedy continuation of ``prompt`` (decoded, without the prompt).

    A quick check that a compressed model still writes text, not only scores it: perplexity can
    stay acceptable while generation degenerates into repetition.
    """
    inputs = tokenizer(prompt, return_tensors="pt").to(model_device(model))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            )
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def worst_ratio(quality: Mapping[str, Any], reference: Mapping[str, Any]) -> tuple[str, float]:
    """The key whose value grew the most from ``reference`` to ``quality``, and that ratio.

    Only keys that both hold as numbers count (a perplexity per domain, as
    :func:`language_model_quality` gives it; other entries are passed over).

    Returns
    -------
    (str, float)
        The key and ``quality[key] / reference[key]``.
    """
    ratios = {
        key: float(quality[key]) / float(reference[key]) for key in quality
        if key in reference and isinstance(quality[key], (int, float)) and isinstance(reference[key], (int, float))
        and not isinstance(quality[key], bool) and float(reference[key]) != 0
    }
    if not ratios:
        raise ValueError(f"no numeric key is common to both results ({sorted(quality)} and {sorted(reference)})")
    key = max(ratios, key=ratios.__getitem__)
    return key, ratios[key]


def language_model_quality(
    model: nn.Module,
    tokenizer: Any,
    *,
    data: Sequence[str] | None = None,
    max_tokens: int = 24 * 512,
    seq_len: int | None = None,
    stride: int | None = None,
    reference: Mapping[str, float] | None = None,
    progress: ProgressLike = False,
) -> dict[str, Any]:
    """Perplexity on svdkit's held-out texts (see :mod:`svdkit.tokens`): calibration never sees them.

    Parameters
    ----------
    model : nn.Module
        A causal language model.
    tokenizer : transformers tokenizer
    data : sequence of str, optional
        Evaluation domains (default: every one of :data:`svdkit.tokens.EVALUATION_DOMAINS`:
        ``"in-domain"``, ``"other-domain"``, ``"legal-english"``, ``"math-docs"``), or paths of
        ``.txt`` / ``.pt`` files.
    max_tokens : int
        Tokens of each text (the default, 24 windows of 512, is the field's usual size; a
        domain with less text is scored whole: ``"legal-english"`` holds about 10 windows).
    seq_len, stride : int
        Window and step of :func:`perplexity`.
    reference : mapping, optional
        An earlier result of this function (e.g. the dense model's): the result then also holds
        ``"worst domain"`` and ``"worst ratio"`` (:func:`worst_ratio`: the domain whose
        perplexity grew the most, and its perplexity over the reference's).
    progress : bool or callable

    Returns
    -------
    dict
        domain -> perplexity (float), and the two ``worst`` entries when ``reference`` is given.
    """
    from .tokens import EVALUATION_DOMAINS, evaluation_tokens

    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    result: dict[str, Any] = {
        str(domain): perplexity(
            model, evaluation_tokens(domain, tokenizer, max_tokens=max_tokens, vocab_size=vocab),
            seq_len=seq_len, stride=stride, progress=progress,
        ).perplexity
        for domain in (EVALUATION_DOMAINS if data is None else data)
    }
    if reference is not None:
        result["worst domain"], result["worst ratio"] = worst_ratio(result, reference)
    return result
