"""Real English text that ships with Python and svdkit's dependencies, for calibration and evaluation.

Five sources, read from the running interpreter's standard library and installed packages (nothing
is imported but ``pydoc_data`` and ``idlelib``'s location; nothing is downloaded):

- ``"topics"``: ``pydoc_data.topics`` (the language reference behind ``help()``), ~465 k characters.
- ``"docstrings"``: module docstrings of the standard library's source files (read with ``ast``,
  nothing is imported), a broader mix of subjects.
- ``"idle"``: IDLE's user manual and change log (``idlelib/help.html``, ``idlelib/NEWS.txt``),
  prose about an editor rather than the language.
- ``"licenses"``: plain English legal prose: Python's history and licence (the standard library's
  ``LICENSE.txt``, or the identical copy ``typing_extensions``, a torch dependency, ships) and the
  terms of the Apache License 2.0 (as transformers, huggingface_hub, safetensors, accelerate and
  packaging ship it; the text is the same in each).
- ``"mpmath"``: mathematical exposition: mpmath's documentation of special functions
  (``mpmath/function_docs.py``; mpmath comes with torch through sympy), its doctest examples
  removed.

Two views of each source, both deterministic for given Python and package versions:

- :func:`builtin_sentences`: sentences split from the prose, stripped of markup, de-duplicated
  and kept between 30 and 400 characters (for sentence-embedding models);
- :func:`builtin_documents`: whole documents as running text, code examples included (for
  causal language models, which read token streams): one per pydoc topic, one per standard
  library file (all of its module, class and function docstrings), IDLE's manual and change log,
  one per licence and one per documented mpmath function.

svdkit calibrates on the even halves of ``"topics"`` and ``"docstrings"``
(:func:`calibration_documents`). The evaluation domains (:func:`evaluation_domains`,
:func:`evaluation_documents`) are held out: the odd pydoc topics, IDLE, the licences and mpmath,
each less any paragraph that shares a passage of 64 characters with the calibration text
(:mod:`svdkit.overlap`; about a quarter of the odd pydoc topics repeats the even ones verbatim).
"""

from __future__ import annotations

import ast
import functools
import html
import importlib.util
import re
import sysconfig
import textwrap
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "builtin_documents", "builtin_sentences", "calibration_documents", "calibration_sentences", "evaluation_documents",
    "evaluation_domains", "file_docstrings", "sentence_runs", "split_sentences",
]

Source = Literal["topics", "docstrings", "idle", "licenses", "mpmath"]

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_MIN_CHARS, _MAX_CHARS = 30, 400


def _is_prose(lines: list[str]) -> bool:
    """Whether a paragraph's (stripped, non-empty) lines read like prose: half of them or more start with a letter."""
    return bool(lines) and sum(ln[:1].isalpha() for ln in lines) >= len(lines) / 2


def sentence_runs(text: str) -> list[list[str]]:
    """The sentences of :func:`split_sentences`, in runs of sentences that follow one another in ``text``.

    A run ends where a paragraph that is not prose (code, a table, a heading) or a sentence
    outside 30-400 characters comes between two kept sentences.
    """
    runs: list[list[str]] = [[]]
    for paragraph in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in paragraph.splitlines() if ln.strip()]
        if not lines:
            continue
        # Skip code, tables and headings: lines that do not read like prose.
        if not _is_prose(lines):
            runs.append([])
            continue
        for sentence in _SENTENCE_END.split(" ".join(lines)):
            sentence = sentence.strip()
            if _MIN_CHARS <= len(sentence) <= _MAX_CHARS and sentence[0].isupper() and sentence.count(" ") >= 4:
                runs[-1].append(sentence)
            elif runs[-1]:
                runs.append([])
    return [run for run in runs if run]


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences: whitespace collapsed, markup-ish lines dropped, 30-400 characters."""
    return [sentence for run in sentence_runs(text) for sentence in run]


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
    return tuple(read for read in map(file_docstrings, sorted(root.glob("*.py"))) if read is not None)


def file_docstrings(path: Path, *, min_chars: int = 80) -> tuple[str | None, tuple[str, ...]] | None:
    """A Python source file's module docstring and every module, class and function docstring of at
    least ``min_chars`` characters (stripped), read with ``ast``: nothing is imported. None when the
    file cannot be read or parsed."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError, OSError):
        return None
    docs = [ast.get_docstring(node) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    return ast.get_docstring(tree), tuple(d.strip() for d in docs if d and len(d) >= min_chars)


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


def _document_sentences(source: str) -> tuple[str, ...]:
    return tuple(_dedupe([sentence for doc in _DOCUMENTS[source]() for sentence in split_sentences(doc)]))


_SOURCES = {
    "topics": _topics, "docstrings": _docstrings, "idle": _idle,
    "licenses": lambda: _document_sentences("licenses"), "mpmath": lambda: _document_sentences("mpmath"),
}


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


_RULE = re.compile(r"^\s*([=\-~*#_])\1{2,}\s*$")


def _reflow(text: str) -> str:
    """Paragraphs of prose on one line each (hard line breaks and runs of spaces undone), rulers
    dropped, other blocks (tables, formulas) kept line by line."""
    blocks = []
    for paragraph in re.split(r"\n\s*\n", text):
        lines = [ln.rstrip() for ln in paragraph.splitlines() if ln.strip() and not _RULE.match(ln)]
        stripped = [ln.strip() for ln in lines]
        if _is_prose(stripped):
            blocks.append(re.sub(r"\s+", " ", " ".join(stripped)))
        elif lines:
            blocks.append(textwrap.dedent("\n".join(lines)))
    return "\n\n".join(blocks)


def _distribution_license(name: str, marker: str) -> str | None:
    """The text of the first licence file of an installed distribution that contains ``marker``."""
    from importlib import metadata

    try:
        files = metadata.distribution(name).files or []
    except metadata.PackageNotFoundError:
        return None
    for file in files:
        if re.search(r"LICEN[CS]E|COPYING", file.name, re.I):
            try:
                text = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if text and marker in text:
                return text
    return None


_APACHE_HOLDERS = ("transformers", "huggingface_hub", "safetensors", "accelerate", "packaging", "tokenizers")
_APACHE_END = "END OF TERMS AND CONDITIONS"


@functools.lru_cache(maxsize=None)
def _license_documents() -> tuple[str, ...]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    found = [path for path in (stdlib / "LICENSE.txt", stdlib / "LICENSE") if path.is_file()]
    python = found[0].read_text(encoding="utf-8") if found else _distribution_license("typing_extensions", "HISTORY OF THE SOFTWARE")
    if python is None:
        raise FileNotFoundError(
            f"Python's LICENSE.txt is not in {stdlib} and typing_extensions is not installed: the 'licenses' text "
            "needs one of them (pip install typing_extensions)"
        )
    for name in _APACHE_HOLDERS:
        apache = _distribution_license(name, "Version 2.0, January 2004")
        if apache and "Apache License" in apache and _APACHE_END in apache:
            # The terms only: the copyright line above and the appendix below differ between copies.
            apache = apache[apache.index("Apache License"):apache.index(_APACHE_END) + len(_APACHE_END)]
            return (_reflow(python), _reflow(apache))
    raise FileNotFoundError(
        f"no installed distribution of {', '.join(_APACHE_HOLDERS)} ships the Apache License 2.0 text the 'licenses' "
        "text needs (pip install transformers)"
    )


_DIRECTIVE = re.compile(r"^\.\. ?([\w-]+) ?::?")
_ROLE = re.compile(r":[\w:]+:`~?([^`]*)`")


def _rst_prose(doc: str) -> str:
    """A reStructuredText docstring as prose: doctest examples, images and included files dropped,
    formulas and notes kept, inline markup removed."""
    kept, inside = [], False
    for paragraph in re.split(r"\n\s*\n", doc):
        if not paragraph.strip():
            continue
        first = paragraph.strip().splitlines()[0]
        directive = _DIRECTIVE.match(first)
        if directive:
            inside = directive.group(1) in ("math", "note")
            if inside and len(paragraph.strip().splitlines()) > 1:
                kept.append(paragraph.strip().split("\n", 1)[1])
            continue
        if paragraph.lstrip("\n")[:1].isspace() and not inside:
            continue  # a literal block (examples) outside a formula or a note
        inside = inside and paragraph.lstrip("\n")[:1].isspace()
        if re.search(r"^\s*>>>", paragraph, re.M):
            continue
        kept.append(paragraph)
    text = "\n\n".join(kept)
    text = _ROLE.sub(r"\1", text)
    text = re.sub(r"\s?::$", ":", text, flags=re.M)
    text = text.replace("``", "").replace("**", "").replace("`", "")
    return _reflow(text)


@functools.lru_cache(maxsize=None)
def _mpmath_documents() -> tuple[str, ...]:
    spec = importlib.util.find_spec("mpmath")
    path = Path(spec.origin).parent / "function_docs.py" if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError("the 'mpmath' text is mpmath's function_docs.py: pip install mpmath (torch installs it through sympy)")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    documents = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            text = _rst_prose(node.value.value)
            if len(text) >= 200:
                documents.append(text)
    return tuple(documents)


_DOCUMENTS = {
    "topics": _topic_documents, "docstrings": _docstring_documents, "idle": _idle_documents,
    "licenses": _license_documents, "mpmath": _mpmath_documents,
}


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
    source : {"topics", "docstrings", "idle", "licenses", "mpmath"}
        See the module docstring. ``"idle"`` has two documents (the manual and the change log),
        ``"licenses"`` two (Python's, the Apache License 2.0).
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
    source : {"topics", "docstrings", "idle", "licenses", "mpmath"}
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


# name -> (what it is, where its documents come from). Calibration never sees any of them.
_EVALUATION: dict[str, tuple[str, Any]] = {
    "in-domain": ("the odd-indexed pydoc topics: the calibration's subject, other sections",
                  lambda: builtin_documents("topics", split="odd")),
    "other-domain": ("IDLE's user manual and change log: prose about an editor", lambda: builtin_documents("idle")),
    "legal-english": ("plain English legal prose: Python's history and licence, the Apache License 2.0",
                      lambda: builtin_documents("licenses")),
    "math-docs": ("mathematical exposition: mpmath's documentation of special functions, without its examples",
                  lambda: builtin_documents("mpmath")),
}


def evaluation_domains() -> dict[str, str]:
    """The built-in held-out evaluation domains, name -> what the text is (iterate it for the names)."""
    return {name: description for name, (description, _) in _EVALUATION.items()}


@functools.lru_cache(maxsize=None)
def _held_out(domain: str) -> tuple[str, ...]:
    from .overlap import remove_shared_paragraphs

    return tuple(remove_shared_paragraphs(_EVALUATION[domain][1](), calibration_documents()))


def evaluation_documents(domain: str) -> list[str]:
    """The documents of a held-out evaluation domain (see :func:`evaluation_domains`).

    Every paragraph that shares a passage of 64 characters or more with the calibration text
    (:func:`calibration_documents`, compared as :func:`svdkit.overlap.shared_passages` does) is
    removed, so that no evaluation text repeats calibration text.

    Raises
    ------
    ValueError
        For an unknown domain (the message lists the known ones).
    """
    if domain not in _EVALUATION:
        raise ValueError(f"unknown evaluation domain {domain!r}; choose one of {list(_EVALUATION)}")
    return list(_held_out(domain))
