"""Real English text that ships with CPython, for calibration and evaluation on any machine.

Three sources, all read from the running interpreter's standard library:

- ``"topics"``: ``pydoc_data.topics`` (the language reference behind ``help()``), ~465 k characters.
- ``"docstrings"``: module docstrings of the standard library's source files (read with ``ast``,
  nothing is imported), a broader mix of subjects.
- ``"idle"``: IDLE's user manual and change log (``idlelib/help.html``, ``idlelib/NEWS.txt``),
  prose about an editor rather than the language. svdkit never calibrates on it, which makes it
  the held-out domain for judging how well a calibration generalises.

Two views of each source, both deterministic for a given Python version:

- :func:`builtin_sentences`: sentences split from the prose, stripped of markup, de-duplicated
  and kept between 30 and 400 characters (for sentence-embedding models);
- :func:`builtin_documents`: whole documents as running text, code examples included (for
  causal language models, which read token streams): one per pydoc topic, one per standard
  library file (all of its module, class and function docstrings), and IDLE's manual and
  change log.
"""

from __future__ import annotations

import ast
import functools
import html
import re
import sysconfig
from pathlib import Path
from typing import Literal

__all__ = ["builtin_documents", "builtin_sentences", "calibration_documents", "calibration_sentences", "split_sentences"]

Source = Literal["topics", "docstrings", "idle"]

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_MIN_CHARS, _MAX_CHARS = 30, 400


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences: whitespace collapsed, markup-ish lines dropped, 30-400 characters."""
    out = []
    for paragraph in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in paragraph.splitlines()]
        # Skip code, tables and headings: lines that do not read like prose.
        if not lines or sum(ln[:1].isalpha() for ln in lines if ln) < len([ln for ln in lines if ln]) / 2:
            continue
        flat = " ".join(ln for ln in lines if ln)
        for sentence in _SENTENCE_END.split(flat):
            sentence = sentence.strip()
            if _MIN_CHARS <= len(sentence) <= _MAX_CHARS and sentence[0].isupper() and sentence.count(" ") >= 4:
                out.append(sentence)
    return out


def _dedupe(sentences: list[str]) -> list[str]:
    seen: set[str] = set()
    return [s for s in sentences if not (s in seen or seen.add(s))]


@functools.lru_cache(maxsize=None)
def _topics() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    return tuple(_dedupe([s for key in sorted(topics) for s in split_sentences(topics[key])]))


@functools.lru_cache(maxsize=None)
def _docstrings() -> tuple[str, ...]:
    sentences: list[str] = []
    for module_doc, _ in _stdlib_docstrings():
        if module_doc:
            sentences.extend(split_sentences(module_doc))
    return tuple(_dedupe(sentences))


@functools.lru_cache(maxsize=None)
def _stdlib_docstrings() -> tuple[tuple[str | None, tuple[str, ...]], ...]:
    """Per standard-library file (sorted): its module docstring, and every module, class and
    function docstring of at least 80 characters. Read with ``ast``: nothing is imported."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError, OSError):
            continue
        docs = [ast.get_docstring(node) for node in ast.walk(tree)
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        files.append((ast.get_docstring(tree), tuple(d.strip() for d in docs if d and len(d) >= 80)))
    return tuple(files)


@functools.lru_cache(maxsize=None)
def _idle() -> tuple[str, ...]:
    import idlelib

    folder = Path(idlelib.__file__).parent
    text = ""
    manual = folder / "help.html"
    if manual.exists():
        body = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", manual.read_text(encoding="utf-8"), flags=re.S)
        body = re.sub(r"</(p|li|dd|dt|h\d|div|pre)>", "\n\n", body)
        text += html.unescape(re.sub(r"<[^>]+>", " ", body))
    news = folder / "NEWS.txt"
    if news.exists():
        # Change-log entries are bullets; turn each into a paragraph of prose.
        text += "\n\n" + re.sub(r"^\s*[-*]\s+", "\n\n", news.read_text(encoding="utf-8"), flags=re.M)
    return tuple(_dedupe(split_sentences(text)))


_SOURCES = {"topics": _topics, "docstrings": _docstrings, "idle": _idle}


@functools.lru_cache(maxsize=None)
def _topic_documents() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    return tuple(topics[key].strip() for key in sorted(topics))


@functools.lru_cache(maxsize=None)
def _docstring_documents() -> tuple[str, ...]:
    return tuple("\n\n".join(docs) for _, docs in _stdlib_docstrings() if docs)


@functools.lru_cache(maxsize=None)
def _idle_documents() -> tuple[str, ...]:
    import idlelib

    folder = Path(idlelib.__file__).parent
    documents = []
    manual = folder / "help.html"
    if manual.exists():
        body = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", manual.read_text(encoding="utf-8"), flags=re.S)
        body = re.sub(r"</(p|li|dd|dt|h\d|div|pre)>", "\n\n", body)
        text = html.unescape(re.sub(r"<[^>]+>", " ", body))
        lines = [re.sub(r"[ \t]+", " ", line).strip() for line in text.splitlines()]
        documents.append(re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip())
    news = folder / "NEWS.txt"
    if news.exists():
        documents.append(news.read_text(encoding="utf-8").strip())
    return tuple(documents)


_DOCUMENTS = {"topics": _topic_documents, "docstrings": _docstring_documents, "idle": _idle_documents}


def _check_source(source: str, split: str) -> None:
    if source not in _SOURCES:
        raise ValueError(f"unknown text source {source!r}; choose one of {sorted(_SOURCES)}")
    if split not in ("all", "even", "odd"):
        raise ValueError(f"split must be 'all', 'even' or 'odd', got {split!r}")


def _halve(items: list, split: str) -> list:
    return items[0::2] if split == "even" else items[1::2] if split == "odd" else items


def builtin_documents(source: Source = "topics", *, split: Literal["all", "even", "odd"] = "all") -> list[str]:
    """Whole documents of one built-in source, as running text.

    Parameters
    ----------
    source : {"topics", "docstrings", "idle"}
        See the module docstring. ``"idle"`` has two documents (the manual and the change log).
    split : {"all", "even", "odd"}
        Every document, or the even- or odd-indexed ones: disjoint halves for calibrating on one
        and evaluating on the other.

    Returns
    -------
    list of str
    """
    _check_source(source, split)
    return _halve(list(_DOCUMENTS[source]()), split)


def calibration_documents() -> list[str]:
    """The ``builtin`` calibration text for language models: the even-indexed pydoc topics and
    standard-library files, interleaved (the odd halves and ``"idle"`` stay free for evaluation).
    """
    topics, docs = builtin_documents("topics", split="even"), builtin_documents("docstrings", split="even")
    return [d for pair in zip(topics, docs) for d in pair] + topics[len(docs):] + docs[len(topics):]


def builtin_sentences(source: Source = "topics", *, split: Literal["all", "even", "odd"] = "all") -> list[str]:
    """Sentences of one built-in English source.

    Parameters
    ----------
    source : {"topics", "docstrings", "idle"}
        See the module docstring.
    split : {"all", "even", "odd"}
        Every sentence, or the even- or odd-indexed ones: disjoint halves for calibrating on one
        and evaluating on the other.

    Returns
    -------
    list of str
    """
    _check_source(source, split)
    return _halve(list(_SOURCES[source]()), split)


def calibration_sentences(n: int = 256) -> list[str]:
    """The ``builtin`` calibration set: ``n`` sentences interleaving the even-indexed halves of
    ``"topics"`` and ``"docstrings"`` (the odd halves and ``"idle"`` stay free for evaluation).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    topics, docs = builtin_sentences("topics", split="even"), builtin_sentences("docstrings", split="even")
    mixed = [s for pair in zip(topics, docs) for s in pair] + topics[len(docs):] + docs[len(topics):]
    # Spread the picks over the whole pool rather than taking its head.
    step = max(1, len(mixed) // n)
    return mixed[::step][:n]
