"""Verbatim overlap between texts: the passages one text shares with another.

Held-out evaluation text must not repeat the calibration text, or the perplexity it gives is
optimistic. Texts are compared after lower-casing and collapsing every run of whitespace into one
space, so that a passage re-wrapped or re-indented still counts as shared. A shared run counts when
it holds a window of ``length`` characters (64 by default) at least half of which are letters or
digits (a ruler of dashes is not text): the texts share a passage exactly when some such window of
one is also a window of the other.

The search indexes the reference at every ``length // 2``-th character: any common run of
``length`` characters covers one of those blocks whole, so every shared run is found, with one
dictionary lookup per character of the texts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

__all__ = ["SharedPassage", "remove_shared_paragraphs", "shared_passages"]

_WHITESPACE = re.compile(r"\s+")
_PARAGRAPH_BREAK = re.compile(r"\n(?:[ \t]*\n)+")


@dataclass(frozen=True)
class SharedPassage:
    """A run of one text that a reference text also holds.

    Attributes
    ----------
    index : int
        Which of the texts.
    start, end : int
        The run's span in that text (characters of the original, not normalized, text).
    reference : int
        Which of the reference texts holds it.
    text : str
        The shared run, normalized (lower case, whitespace collapsed).
    """

    index: int
    start: int
    end: int
    reference: int
    text: str


def _normalize(text: str) -> tuple[str, list[int]]:
    """Lower case with whitespace runs collapsed to one space, and each character's position in ``text``."""
    chars: list[str] = []
    positions: list[int] = []
    last = 0
    for match in _WHITESPACE.finditer(text):
        chars.append(text[last:match.start()].lower())
        positions.extend(range(last, match.start()))
        chars.append(" ")
        positions.append(match.start())
        last = match.end()
    chars.append(text[last:].lower())
    positions.extend(range(last, len(text)))
    normalized = "".join(chars)
    if len(normalized) != len(positions):  # lower() changed a length (e.g. "İ"): keep the text as it is
        return text, list(range(len(text)))
    return normalized, positions


def _has_text_window(run: str, length: int) -> bool:
    """Whether some ``length`` characters of ``run`` in a row are at least half letters or digits."""
    if len(run) < length:
        return False
    count = sum(c.isalnum() for c in run[:length])
    for k in range(length, len(run) + 1):
        if 2 * count >= length:
            return True
        if k < len(run):
            count += run[k].isalnum() - run[k - length].isalnum()
    return False


def shared_passages(texts: Sequence[str], reference: Sequence[str], *, length: int = 64) -> list[SharedPassage]:
    """Every maximal run of ``texts`` that some ``reference`` text also holds (see the module docstring).

    Parameters
    ----------
    texts, reference : sequence of str
    length : int
        The shortest run that counts (at least 2).

    Returns
    -------
    list of SharedPassage
        Sorted by text and position; empty when the texts share nothing with the reference.
    """
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise ValueError(f"length must be an int >= 2, got {length!r}")
    block = length // 2
    references = [_normalize(r)[0] for r in reference]
    index: dict[str, list[tuple[int, int]]] = {}
    for j, ref in enumerate(references):
        for p in range(0, len(ref) - block + 1, block):
            index.setdefault(ref[p:p + block], []).append((j, p))
    found: list[SharedPassage] = []
    for i, text in enumerate(texts):
        norm, positions = _normalize(text)
        # Runs found so far, by reference and alignment: an anchor inside one of them adds nothing.
        runs: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for q in range(len(norm) - block + 1):
            for j, p in index.get(norm[q:q + block], ()):
                known = runs.setdefault((j, q - p), [])
                if any(start <= q < end for start, end in known):
                    continue
                ref = references[j]
                left = 0
                while q - left > 0 and p - left > 0 and norm[q - left - 1] == ref[p - left - 1]:
                    left += 1
                right = block
                while q + right < len(norm) and p + right < len(ref) and norm[q + right] == ref[p + right]:
                    right += 1
                start, end = q - left, q + right
                known.append((start, end))
                run = norm[start:end]
                if _has_text_window(run, length):
                    found.append(SharedPassage(i, positions[start], positions[end - 1] + 1, j, run))
    return sorted(found, key=lambda s: (s.index, s.start, s.end, s.reference))


def _paragraph_spans(text: str) -> list[tuple[int, int]]:
    spans, begin = [], 0
    for match in _PARAGRAPH_BREAK.finditer(text):
        spans.append((begin, match.start()))
        begin = match.end()
    spans.append((begin, len(text)))
    return [(a, b) for a, b in spans if text[a:b].strip()]


def remove_shared_paragraphs(texts: Sequence[str], reference: Sequence[str], *, length: int = 64) -> list[str]:
    """``texts`` less every paragraph (a block between blank lines) that shares a passage with ``reference``.

    Texts left empty are dropped. The search runs again on what is left until nothing is shared
    (a removal can join two paragraphs' edges into a new shared run, in principle).

    Returns
    -------
    list of str
        The paragraphs kept, joined by one blank line.
    """
    texts = list(texts)
    while True:
        shared = shared_passages(texts, reference, length=length)
        if not shared:
            return [t for t in texts if t.strip()]
        spans: dict[int, list[tuple[int, int]]] = {}
        for s in shared:
            spans.setdefault(s.index, []).append((s.start, s.end))
        for i, cut in spans.items():
            kept = [texts[i][a:b] for a, b in _paragraph_spans(texts[i]) if not any(a < e and s < b for s, e in cut)]
            texts[i] = "\n\n".join(kept)
