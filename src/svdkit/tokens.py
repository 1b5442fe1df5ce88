"""Token streams for causal language models: calibration windows and evaluation text.

LLM compression methods calibrate on ``N`` sequences of ``L`` tokens and are judged by the
perplexity of held-out text (SVD-LLM, arXiv:2403.07378: 256 random 2048-token windows of
WikiText-2). svdkit does the same with text that ships with Python (:mod:`svdkit.data`):

=====================  ================================================================
``"builtin"``          calibration: the even pydoc topics and standard-library files
a calibration mix      calibration: registered sources joined by ``+`` (``"pydoc+stdlib+
                       networkx"``, :mod:`svdkit.corpus`)
``"in-domain"``        evaluation: the odd pydoc topics (never calibrated on)
``"other-domain"``     evaluation: IDLE's manual and change log (another subject, never
                       calibrated on), to see how a calibration generalises
``"legal-english"``    evaluation: plain English legal prose (Python's history and licence,
                       the Apache License 2.0), ~5.4 k SmolLM2 tokens
``"math-docs"``        evaluation: mathematical exposition (mpmath's documentation of
                       special functions, its examples removed)
a ``.txt`` file        a user's text, read as UTF-8
a ``.pt`` file         a 1-D stream or an (N, L) tensor of token ids
=====================  ================================================================

The evaluation domains are :func:`svdkit.data.evaluation_domains`; no paragraph of theirs shares
a passage of 64 characters with the calibration text (:func:`svdkit.data.evaluation_documents`).

Documents are joined into one stream, each followed by the tokenizer's end-of-text token, as
language models are pre-trained. Calibration windows start at positions drawn from a seeded
generator, so a seed gives the same windows on every machine.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Sequence

import torch

from .corpus import CALIBRATION_SOURCES, is_mix, mix_windows
from .data import calibration_documents, evaluation_documents, evaluation_domains
from .tensor_file import read_tensor_file

__all__ = ["EVALUATION_DOMAINS", "calibration_tokens", "check_token_ids", "evaluation_tokens", "token_stream"]

EVALUATION_DOMAINS = tuple(evaluation_domains())


def token_stream(texts: Sequence[str], tokenizer: Any) -> torch.Tensor:
    """Tokenize documents into one stream, each followed by the end-of-text token.

    Parameters
    ----------
    texts : sequence of str
    tokenizer : transformers tokenizer
        Called without special tokens; its ``eos_token_id`` (if any) separates documents.

    Returns
    -------
    Tensor of shape (T,), int64
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(int(eos))
    return torch.tensor(ids, dtype=torch.long)


@functools.lru_cache(maxsize=16)
def _cached_stream(name: str, tokenizer_key: tuple, tokenizer: Any) -> torch.Tensor:
    return token_stream(calibration_documents() if name == "builtin" else evaluation_documents(name), tokenizer)


def _builtin_stream(name: str, tokenizer: Any) -> torch.Tensor:
    key = (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer))
    return _cached_stream(name, key, tokenizer)


def check_token_ids(ids: torch.Tensor, vocab_size: int | None, *, where: str) -> torch.Tensor:
    """Refuse token ids that are not integers or lie outside ``[0, vocab_size)``.

    Returns
    -------
    Tensor
        ``ids`` as int64.
    """
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{where} must hold a tensor of token ids, got {type(ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{where} holds {ids.dtype} values; token ids must be integers")
    if ids.numel() == 0:
        raise ValueError(f"{where} holds no token ids")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        raise ValueError(
            f"{where} holds token ids in [{low}, {high}], outside the model's vocabulary [0, {vocab_size})"
        )
    return ids.long()


def _source_stream(source: str | Path | torch.Tensor, tokenizer: Any, vocab_size: int | None) -> torch.Tensor:
    """A 1-D stream, or an (N, L) tensor when the source is already cut into sequences."""
    if isinstance(source, torch.Tensor):
        return check_token_ids(source, vocab_size, where="the token tensor")
    if source in ("builtin", *EVALUATION_DOMAINS):
        if tokenizer is None:
            raise ValueError(f"the {source!r} text needs the model's tokenizer")
        return _builtin_stream(str(source), tokenizer)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"no token or text file at {str(source)!r}: use 'builtin' (calibration), a calibration source or mix of "
            f"{', '.join(sorted(CALIBRATION_SOURCES))} joined by '+', an evaluation domain "
            f"({', '.join(EVALUATION_DOMAINS)}), a .txt file or a .pt tensor of token ids"
        )
    if path.suffix in (".pt", ".pth"):
        ids = read_tensor_file(path, holds="token ids, of shape (T,) or (N, L)")
        if ids.ndim not in (1, 2):
            raise ValueError(f"{path} holds a tensor of shape {tuple(ids.shape)}; expected token ids of shape (T,) or (N, L)")
        return check_token_ids(ids, vocab_size, where=str(path))
    if tokenizer is None:
        raise ValueError(f"the text file {path} needs a model with a tokenizer")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text (byte {exc.start}): pass a text file or a .pt tensor of token ids") from exc
    if not text.strip():
        raise ValueError(f"{path} holds no text")
    return token_stream([text], tokenizer)


def calibration_tokens(
    source: str | Path | torch.Tensor = "builtin",
    tokenizer: Any = None,
    *,
    n_seqs: int = 128,
    seq_len: int = 256,
    seed: int = 0,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """``n_seqs`` windows of ``seq_len`` tokens for calibration, drawn reproducibly.

    Parameters
    ----------
    source : str, Path or Tensor
        ``"builtin"``, a calibration mix (registered sources joined by ``+``, each drawn from
        alone, see :func:`svdkit.corpus.mix_windows`), a ``.txt`` file, a ``.pt`` file or a
        tensor of token ids: a 1-D stream (windows are drawn from it) or an (N, L) tensor (its
        first ``n_seqs`` rows, cut to ``seq_len`` tokens).
    tokenizer : transformers tokenizer, optional
        Needed for text.
    n_seqs, seq_len : int
    seed : int
        Seed of the window positions.
    vocab_size : int, optional
        Refuse token ids outside ``[0, vocab_size)``.

    Returns
    -------
    Tensor of shape (n_seqs, seq_len), int64

    Raises
    ------
    ValueError
        If the text is shorter than one sequence, ids fall outside the vocabulary, the sizes
        are not positive, or a mix names an unknown source; the message names the source and
        the sizes.
    """
    for name, value in (("n_seqs", n_seqs), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if is_mix(source):
        if tokenizer is None:
            raise ValueError(f"the calibration mix {source!r} is text: it needs the model's tokenizer")
        return mix_windows(str(source), tokenizer, n_seqs=n_seqs, seq_len=seq_len, seed=seed, stream=token_stream)
    ids = _source_stream(source, tokenizer, vocab_size)
    what = "the token tensor" if isinstance(source, torch.Tensor) else repr(str(source))
    if ids.ndim == 2:
        if ids.shape[1] < seq_len:
            raise ValueError(f"{what} has sequences of {ids.shape[1]} tokens, shorter than seq_len={seq_len}")
        return ids[:n_seqs, :seq_len].contiguous()
    if ids.numel() < seq_len:
        raise ValueError(f"{what} holds {ids.numel()} tokens, shorter than one sequence of seq_len={seq_len}")
    generator = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n_seqs,), generator=generator)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def evaluation_tokens(
    domain: str | Path | torch.Tensor = "in-domain",
    tokenizer: Any = None,
    *,
    max_tokens: int | None = 24 * 512,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Held-out text as one token stream, for :func:`svdkit.eval.perplexity`.

    Parameters
    ----------
    domain : str, path or Tensor
        A built-in evaluation domain (:data:`EVALUATION_DOMAINS`, see the module docstring), a
        ``.txt``/``.pt`` file or ids.
    tokenizer : transformers tokenizer, optional
    max_tokens : int or None
        Keep the first this many tokens (the default is 24 sequences of 512).
    vocab_size : int, optional

    Returns
    -------
    Tensor of shape (T,), int64

    Raises
    ------
    ValueError
        For ``"builtin"``, the calibration text (a measure on it would not be held out).
    """
    if isinstance(domain, str) and domain == "builtin":
        raise ValueError("'builtin' is the calibration text: a model is measured on text it was not calibrated on, "
                         f"{' or '.join(map(repr, EVALUATION_DOMAINS))} (or a file of your own)")
    ids = _source_stream(domain, tokenizer, vocab_size).reshape(-1)
    return ids[:max_tokens] if max_tokens is not None else ids
