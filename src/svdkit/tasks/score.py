"""Zero-shot multiple-choice accuracy of a causal language model, scored as lm-evaluation-harness scores it.

For each item and choice, the request is ``(context, target_delimiter + choice)``; as lm-eval
0.4.13 does (``LM._encode_pair``), trailing spaces of the context move to the continuation, the
context is tokenized alone and the continuation's tokens are those of ``context + continuation``
after the context's tokens, both with the tokenizer's default special tokens. A choice's score is
the sum of the log-probabilities of its continuation tokens; the metrics are lm-eval's:

- ``acc``: the highest score is the target (ties go to the first choice, as ``numpy.argmax``);
- ``acc_norm``: the same with each score divided by the choice's length in characters
  (``len(choice)``, the delimiter excluded: lm-eval 0.4.13's ``acc_norm``; its ``acc_bytes``
  divides by UTF-8 bytes, the same for ASCII text);
- ``exact_match``: the target's continuation is the model's greedy continuation, token by token;
- the standard errors are lm-eval's ``mean_stderr``: the sample standard deviation (``n - 1``)
  over ``sqrt(n)``.

Two ways to compute the scores, equal up to float rounding:

- ``share_context=False``: each (context, continuation) pair is one sequence, left-truncated to
  the model's context, right-padded in a batch and run without an attention mask: lm-eval's
  ``HFLM._loglikelihood_tokens``;
- ``share_context=True`` (the default for transformers models): the context of an item runs once
  (the decoder alone, its key/value cache kept) and every choice continues from that cache, so
  that an item costs its context plus its choices rather than four contexts.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..causal_lm import cache_keyword
from ..eval import model_device, model_logits
from ..progress import ProgressLike, track
from .items import MultipleChoiceTask

__all__ = ["MultipleChoiceResult", "choice_loglikelihoods", "encode_pair", "model_context_length", "score_multiple_choice"]

_CONTEXT_ATTRIBUTES = ("n_positions", "max_position_embeddings", "n_ctx")  # as lm-eval's HFLM.max_length reads them
_DEFAULT_CONTEXT = 2048
_CHUNK_TOKENS = 1024  # padded tokens of one model call over the choices (its logits: tokens x vocab floats)


@dataclass(frozen=True)
class MultipleChoiceResult:
    """Accuracy of a model on a :class:`~svdkit.tasks.MultipleChoiceTask` (see the module docstring).

    Attributes
    ----------
    task : str
    n : int
        Items scored.
    acc, acc_stderr, acc_norm, acc_norm_stderr, exact_match, exact_match_stderr : float
    seconds : float
        Wall time of the scoring.
    loglikelihoods : tuple of tuple of float
        Per item, the score of each choice.
    """

    task: str
    n: int
    acc: float
    acc_stderr: float
    acc_norm: float
    acc_norm_stderr: float
    exact_match: float
    exact_match_stderr: float
    seconds: float
    loglikelihoods: tuple[tuple[float, ...], ...]

    def to_dict(self, *, per_item: bool = False) -> dict[str, Any]:
        out = asdict(self)
        if not per_item:
            out.pop("loglikelihoods")
        return out


def model_context_length(model: nn.Module) -> int:
    """The longest input the model takes, read as lm-eval's ``HFLM`` reads it (2048 if its config says nothing)."""
    config = getattr(model, "config", None)
    for name in _CONTEXT_ATTRIBUTES:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return _DEFAULT_CONTEXT


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a context and its continuation, split as lm-eval 0.4.13 splits them (see the module docstring)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = list(tokenizer(context + continuation)["input_ids"])
    context_ids = list(tokenizer(context)["input_ids"])
    return context_ids, whole[len(context_ids):]


def _score_rows(logits: torch.Tensor, targets: Sequence[list[int]]) -> list[tuple[float, bool]]:
    """(sum of log-probabilities, all greedy) of each row's target tokens, read from its first positions."""
    out = []
    for row, tokens in zip(logits, targets):
        logp = F.log_softmax(row[: len(tokens)].float(), dim=-1)
        ids = torch.tensor(tokens, device=logp.device)
        out.append((float(logp.gather(-1, ids[:, None]).sum()), bool((logp.argmax(-1) == ids).all())))
    return out


def _full_sequences(model: nn.Module, pairs: Sequence[tuple[list[int], list[int]]], limit: int) -> list[tuple[float, bool]]:
    """lm-eval's way: each pair one right-padded sequence, no attention mask."""
    device = model_device(model)
    inputs = [(ctx + cont)[-(limit + 1):][:-1] for ctx, cont in pairs]
    logits = model_logits(model, _padded(inputs)[0].to(device))
    # The continuation's tokens are predicted by the last len(cont) positions of each input.
    rows = [logits[row, len(seq) - len(cont): len(seq)] for row, (seq, (_, cont)) in enumerate(zip(inputs, pairs))]
    return [score for row, (_, cont) in zip(rows, pairs) for score in _score_rows(row[None], [cont])]


def _select_cache(cache: Any, index: torch.Tensor, *, copy_first: bool) -> Any:
    """The cache's rows ``index`` (repeated as needed), leaving ``cache`` itself as it was when ``copy_first``."""
    if isinstance(cache, tuple):  # a legacy cache: per layer, (keys, values)
        return tuple(tuple(t.index_select(0, index) for t in layer) for layer in cache)
    cache = copy.deepcopy(cache) if copy_first else cache
    cache.reorder_cache(index)
    return cache


def _padded(rows: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (pad 0) and their attention mask, both of shape (rows, longest)."""
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[r, : len(row)] = 1
    return ids, mask


def _shared_context(model: nn.Module, items: Sequence[list[tuple[list[int], list[int]]]]) -> list[list[tuple[float, bool]]]:
    """Each item's context (all but its last token) once through the decoder, every choice from its cache.

    The choices run in chunks of similar length (at most ``_CHUNK_TOKENS`` padded tokens), so that
    a long choice does not pad every other.
    """
    device = model_device(model)
    prefixes = [pairs[0][0][:-1] for pairs in items]
    ids, mask = _padded(prefixes)
    key = cache_keyword(model)
    cache = model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True)[key]
    # Row (i, j) reads item i's last context token, then choice j's continuation but its last token.
    rows = sorted(((i, j) for i, pairs in enumerate(items) for j in range(len(pairs))), key=lambda r: len(items[r[0]][r[1]][1]))
    chunks: list[list[tuple[int, int]]] = [[]]
    for row in rows:
        if chunks[-1] and (len(chunks[-1]) + 1) * len(items[row[0]][row[1]][1]) > _CHUNK_TOKENS:
            chunks.append([])
        chunks[-1].append(row)
    scores: dict[tuple[int, int], tuple[float, bool]] = {}
    for number, chunk in enumerate(chunks):
        owners = [i for i, _ in chunk]
        conts = [items[i][j][1] for i, j in chunk]
        new_ids, new_mask = _padded([[items[i][0][0][-1], *cont[:-1]] for i, cont in zip(owners, conts)])
        starts = torch.tensor([len(prefixes[i]) for i in owners])
        out = model(
            input_ids=new_ids.to(device),
            attention_mask=torch.cat([mask[owners], new_mask], dim=1).to(device),
            position_ids=(starts[:, None] + torch.arange(new_ids.shape[1])[None]).to(device),
            use_cache=True,
            **{key: _select_cache(cache, torch.tensor(owners, device=device), copy_first=number < len(chunks) - 1)},
        )
        logits = out.logits if hasattr(out, "logits") else out[0]
        scores.update(zip(chunk, _score_rows(logits, conts)))
    return [[scores[i, j] for j in range(len(pairs))] for i, pairs in enumerate(items)]


def _can_share(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers comes with the llm extra
        return False
    base = getattr(model, "base_model", None)
    return isinstance(model, PreTrainedModel) and base is not None and base is not model and not getattr(model.config, "is_encoder_decoder", False)


def choice_loglikelihoods(
    model: nn.Module,
    tokenizer: Any,
    task: MultipleChoiceTask,
    *,
    batch_size: int = 32,
    share_context: bool | None = None,
    max_length: int | None = None,
    progress: ProgressLike = False,
) -> list[list[tuple[float, bool]]]:
    """Score every choice of every item: ``(log-likelihood, is greedy)`` per item and choice.

    Parameters
    ----------
    model : nn.Module
        A causal language model called as ``model(input_ids=ids)`` with ``.logits`` of shape
        (batch, seq, vocab). Run in eval mode without gradients; its training flag is restored.
    tokenizer : transformers tokenizer
    task : MultipleChoiceTask
    batch_size : int
        Items per model call.
    share_context : bool, optional
        Run each context once (see the module docstring); default: for transformers models.
    max_length : int, optional
        The model's context (default :func:`model_context_length`); longer pairs lose their
        first tokens, as in lm-eval.

    Returns
    -------
    list of list of (float, bool)
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    limit = model_context_length(model) if max_length is None else int(max_length)
    share = _can_share(model) if share_context is None else bool(share_context)
    encoded = []
    for i, item in enumerate(task.items):
        pairs = [encode_pair(tokenizer, item.context, task.target_delimiter + choice) for choice in item.choices]
        for j, (ctx, cont) in enumerate(pairs):
            if not ctx or not cont:
                what = "context" if not ctx else f"choice {j}"
                raise ValueError(f"item {i} of task {task.name!r}: its {what} tokenizes to no tokens")
            if len(cont) > limit:
                raise ValueError(
                    f"item {i} of task {task.name!r}: choice {j} is {len(cont)} tokens long, longer than the model's "
                    f"context ({limit} tokens); shorten it or pass a larger max_length"
                )
        encoded.append(pairs)
    # The cache path needs a context of two tokens or more and no truncation.
    fits = [share and len(pairs[0][0]) >= 2 and max(len(p[0]) + len(p[1]) for p in pairs) <= limit for pairs in encoded]
    # Longest first, as lm-eval orders its requests, so that a batch pads little.
    order = sorted(range(len(encoded)), key=lambda i: -max(len(c) + len(t) for c, t in encoded[i]))
    batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    results: list[list[tuple[float, bool]]] = [[] for _ in encoded]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in track(batches, progress, desc=f"{task.name} items"):
                shared = [i for i in batch if fits[i]]
                if shared:
                    for i, scores in zip(shared, _shared_context(model, [encoded[i] for i in shared])):
                        results[i] = scores
                alone = [i for i in batch if not fits[i]]
                if alone:
                    scores = iter(_full_sequences(model, [pair for i in alone for pair in encoded[i]], limit))
                    for i in alone:
                        results[i] = [next(scores) for _ in encoded[i]]
    finally:
        model.train(was_training)
    return results


def _mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda k: (values[k], -k))


def score_multiple_choice(
    model: nn.Module,
    tokenizer: Any,
    task: MultipleChoiceTask,
    *,
    batch_size: int = 32,
    share_context: bool | None = None,
    progress: ProgressLike = False,
) -> MultipleChoiceResult:
    """Zero-shot accuracy of a causal LM on a multiple-choice task, as lm-eval scores it.

    Parameters
    ----------
    model, tokenizer, task, batch_size, share_context, progress
        See :func:`choice_loglikelihoods`.

    Returns
    -------
    MultipleChoiceResult
    """
    start = time.perf_counter()
    scores = choice_loglikelihoods(model, tokenizer, task, batch_size=batch_size, share_context=share_context, progress=progress)
    acc, norm, exact = [], [], []
    for item, item_scores in zip(task.items, scores):
        lls = [ll for ll, _ in item_scores]
        acc.append(float(_argmax(lls) == item.target))
        norm.append(float(_argmax([ll / len(c) for ll, c in zip(lls, item.choices)]) == item.target))
        exact.append(float(item_scores[item.target][1]))
    (a, a_se), (n_, n_se), (e, e_se) = _mean_stderr(acc), _mean_stderr(norm), _mean_stderr(exact)
    return MultipleChoiceResult(
        task=task.name, n=len(task.items), acc=a, acc_stderr=a_se, acc_norm=n_, acc_norm_stderr=n_se,
        exact_match=e, exact_match_stderr=e_se, seconds=time.perf_counter() - start,
        loglikelihoods=tuple(tuple(ll for ll, _ in s) for s in scores),
    )
