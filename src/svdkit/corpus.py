"""Calibration text for language models: named sources that ship with Python and svdkit's
dependencies, and mixes of them.

Every source is read from the running interpreter's standard library or an installed package
(with ``ast``: nothing is imported, nothing is downloaded), so it is the same on every machine
with the same versions. None is an evaluation domain (:func:`svdkit.data.evaluation_domains`),
and every paragraph of a source that shares a passage of 64 characters with an evaluation domain
is removed (:func:`svdkit.overlap.remove_shared_paragraphs`): calibration never sees evaluation
text.

====================  ===========================================================================
``"pydoc"``           the even-indexed pydoc topics (half of ``"builtin"``)
``"stdlib"``          the docstrings of the even-indexed standard-library files (its other half)
``"stdlib-odd"``      the docstrings of the odd-indexed standard-library files (not evaluated on:
                      the in-domain evaluation is the odd pydoc topics)
``"stdlib-packages"`` the docstrings of the standard library's packages (``email``, ``json``,
                      ``asyncio``, ...; ``idlelib``, an evaluation domain, ``pydoc_data`` and the
                      tests left out)
``"networkx"``        networkx's docstrings: graph algorithms explained in prose (a torch dependency)
``"torch"``           torch's docstrings (``torch.nn``, ``torch.optim``, ``torch.distributions``,
                      ``torch.utils.data``)
``"numpy"``           numpy's docstrings
====================  ===========================================================================

A **mix** names sources joined by ``+``, each with an optional weight after a colon
(``"pydoc+stdlib+networkx:2"``): :func:`mix_windows` draws each source's share of the windows from
that source alone (shares in proportion to the weights) and interleaves them, so the first batches
(which the curvature pass reads) hold every source. ``"builtin"`` is not a mix: it is svdkit's
calibration text since 0.1, the even pydoc topics and standard-library files interleaved into one
stream (:func:`svdkit.data.calibration_documents`).

Sources by subject (the licences and mpmath, also shipped, are the evaluation domains
``legal-english`` and ``math-docs``; sympy's documentation is left out as mathematical exposition
of the same kind as ``math-docs``).
"""

from __future__ import annotations

import functools
import importlib.util
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .data import file_docstrings

__all__ = ["CALIBRATION_SOURCES", "CalibrationSource", "is_mix", "mix_windows", "parse_mix", "source_documents"]


@dataclass(frozen=True)
class CalibrationSource:
    """A registered calibration text.

    Attributes
    ----------
    name : str
    description : str
    documents : callable
        ``documents() -> tuple of str``: the whole documents, before the evaluation text is removed.
    """

    name: str
    description: str
    documents: Callable[[], tuple[str, ...]]


def _docstrings(root: Path, parts: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> tuple[str, ...]:
    """One document per source file under ``root`` (or under ``root / part`` for each part), sorted:
    every module, class and function docstring of at least 80 characters, read with ``ast``."""
    skipped = {"test", "tests", "testing", "__pycache__", "_vendor", *skip}
    files = sorted(path for base in ([root / p for p in parts] or [root]) for path in base.rglob("*.py"))
    read = (file_docstrings(path) for path in files if not skipped & set(path.relative_to(root).parts))
    return tuple("\n\n".join(docs) for _, docs in filter(None, read) if docs)


def _package_root(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin:
        raise FileNotFoundError(f"the calibration source {name!r} reads the installed package {name}: pip install {name}")
    return Path(spec.origin).parent


_STDLIB_LEFT_OUT = ("idlelib", "pydoc_data", "test", "site-packages", "lib2to3", "ensurepip", "turtledemo", "lib-dynload")


def _stdlib_packages() -> tuple[str, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    packages = [p for p in sorted(root.iterdir()) if p.is_dir() and (p / "__init__.py").is_file()
                and p.name not in _STDLIB_LEFT_OUT]
    return tuple(doc for package in packages for doc in _docstrings(package))


def _builtin_half(source: str, split: str) -> Callable[[], tuple[str, ...]]:
    def documents() -> tuple[str, ...]:
        from .data import builtin_documents

        return tuple(builtin_documents(source, split=split))  # type: ignore[arg-type]
    return documents


CALIBRATION_SOURCES: dict[str, CalibrationSource] = {
    source.name: source for source in (
        CalibrationSource("pydoc", "the even-indexed pydoc topics (the language reference behind help())", _builtin_half("topics", "even")),
        CalibrationSource("stdlib", "docstrings of the even-indexed standard-library files", _builtin_half("docstrings", "even")),
        CalibrationSource("stdlib-odd", "docstrings of the odd-indexed standard-library files", _builtin_half("docstrings", "odd")),
        CalibrationSource("stdlib-packages", "docstrings of the standard library's packages (email, json, asyncio, ...)", _stdlib_packages),
        CalibrationSource("networkx", "networkx's docstrings: graph algorithms in prose",
                          lambda: _docstrings(_package_root("networkx"))),
        CalibrationSource("torch", "torch's docstrings (torch.nn, torch.optim, torch.distributions, torch.utils.data)",
                          lambda: _docstrings(_package_root("torch"), ("nn/modules", "optim", "distributions", "utils/data"))),
        CalibrationSource("numpy", "numpy's docstrings", lambda: _docstrings(_package_root("numpy"))),
    )
}


@functools.lru_cache(maxsize=None)
def _held_out_free(name: str) -> tuple[str, ...]:
    from .data import evaluation_documents, evaluation_domains
    from .overlap import remove_shared_paragraphs

    evaluation = [doc for domain in evaluation_domains() for doc in evaluation_documents(domain)]
    return tuple(remove_shared_paragraphs(CALIBRATION_SOURCES[name].documents(), evaluation))


def source_documents(name: str) -> list[str]:
    """The documents of calibration source ``name``, less every paragraph that shares a passage of
    64 characters with an evaluation domain.

    Raises
    ------
    ValueError
        For an unknown source (the message lists the known ones).
    """
    _check_name(name, name)
    return list(_held_out_free(name))


def _check_name(name: str, mix: str) -> None:
    if name in CALIBRATION_SOURCES:
        return
    from .data import evaluation_domains

    where = f" in the calibration mix {mix!r}" if mix != name else ""
    if name in evaluation_domains():
        raise ValueError(f"{name!r}{where} is an evaluation domain: calibrating on it would measure the model on its own calibration text; "
                         f"choose among {sorted(CALIBRATION_SOURCES)}")
    raise ValueError(f"unknown calibration source {name!r}{where}; known sources: {', '.join(sorted(CALIBRATION_SOURCES))}")


_PART = re.compile(r"^([a-z][a-z0-9_-]*)(?::([0-9]*\.?[0-9]+))?$")


def is_mix(source: Any) -> bool:
    """Whether ``source`` names registered calibration sources (one, or several joined by ``+``)
    rather than ``"builtin"``, an evaluation domain or a file."""
    if not isinstance(source, str) or source == "builtin" or Path(source).suffix in (".txt", ".pt", ".pth"):
        return False
    return "+" in source or source.split(":")[0] in CALIBRATION_SOURCES


def parse_mix(mix: str) -> list[tuple[str, float]]:
    """``"pydoc+stdlib+networkx:2"`` -> ``[("pydoc", 1.0), ("stdlib", 1.0), ("networkx", 2.0)]``.

    Raises
    ------
    ValueError
        A malformed part, a weight that is not positive, a source named twice, an unknown source
        or an evaluation domain (naming it and the known sources).
    """
    if not isinstance(mix, str) or not mix.strip():
        raise ValueError(f"a calibration mix is a string such as 'pydoc+stdlib+networkx', got {mix!r}")
    parts = []
    for part in mix.split("+"):
        match = _PART.match(part.strip())
        if match is None:
            raise ValueError(f"calibration mix {mix!r}: {part!r} is not 'name' or 'name:weight'")
        name, weight = match.group(1), float(match.group(2) or 1.0)
        _check_name(name, mix)
        if weight <= 0:
            raise ValueError(f"calibration mix {mix!r}: the weight of {name!r} must be > 0, got {weight:g}")
        if name in (n for n, _ in parts):
            raise ValueError(f"calibration mix {mix!r} names {name!r} twice")
        parts.append((name, weight))
    return parts


def _shares(total: int, weights: list[float]) -> list[int]:
    """``total`` split in proportion to ``weights`` (largest remainders; every part gets its floor)."""
    exact = [total * w / sum(weights) for w in weights]
    counts = [int(e) for e in exact]
    for i in sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))[: total - sum(counts)]:
        counts[i] += 1
    return counts


def mix_windows(mix: str, tokenizer: Any, *, n_seqs: int, seq_len: int, seed: int = 0,
                stream: Callable[[list[str], Any], torch.Tensor] | None = None) -> torch.Tensor:
    """``n_seqs`` windows of ``seq_len`` tokens drawn from a calibration mix, reproducibly.

    Each source's share of the windows (in proportion to its weight) starts at positions drawn
    with ``seed`` from that source's token stream (its documents joined, each followed by the
    end-of-text token); the sources' windows are interleaved in turn.

    Returns
    -------
    Tensor of shape (n_seqs, seq_len), int64

    Raises
    ------
    ValueError
        A bad mix (see :func:`parse_mix`), or a source shorter than one window.
    """
    from .tokens import token_stream

    parts = parse_mix(mix)
    per_source = []
    for offset, ((name, _), count) in enumerate(zip(parts, _shares(n_seqs, [w for _, w in parts]))):
        ids = _source_tokens(name, tokenizer, stream or token_stream)
        if ids.numel() < seq_len:
            raise ValueError(f"calibration source {name!r} holds {ids.numel()} tokens, fewer than one window of {seq_len}")
        generator = torch.Generator().manual_seed(int(seed) * 1009 + offset)
        starts = torch.randint(0, ids.numel() - seq_len + 1, (count,), generator=generator)
        per_source.append([ids[s:s + seq_len] for s in starts.tolist()])
    rows = [windows[i] for i in range(max(map(len, per_source))) for windows in per_source if i < len(windows)]
    return torch.stack(rows)


_STREAMS: dict[tuple, torch.Tensor] = {}


def _source_tokens(name: str, tokenizer: Any, stream: Callable[[list[str], Any], torch.Tensor]) -> torch.Tensor:
    key = (name, type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer))
    if key not in _STREAMS:
        _STREAMS[key] = stream(source_documents(name), tokenizer)
    return _STREAMS[key]
