"""Options shared by the subcommands, so every command spells a knob the same way.

==============================  ==========================================================
``--targets a b``               layer names or dotted suffixes (PEFT style); a single
                                argument with a regex character other than ``.`` (such as
                                ``*``, ``[``, ``|``) is a full-match regex
``--exclude a b``               same syntax, layers to leave alone
``--rank / --energy / --error``  the rank vocabulary (``--params`` where a budget applies)
``--json FILE``                 also write the result as JSON to FILE (``-`` for stdout)
``--overwrite``                 replace an existing output directory
``--no-progress``               hide progress bars and progress log lines
==============================  ==========================================================

Output paths are checked before any work starts (:func:`check_outputs`), so a bad path never
costs a long run.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

# A dot is also a regex character, but module names are full of dots: one argument reads as a
# regex only when it has one of these.
_REGEX_CHARACTERS = set("*[]()|^$+?\\{}")


def add_target_options(parser: argparse.ArgumentParser, *, what: str = "layers to work on") -> None:
    """``--targets`` and ``--exclude``."""
    parser.add_argument("--targets", nargs="+", metavar="NAME",
                        help=f"{what}: names or dotted suffixes (PEFT style); one argument with regex characters is a full-match regex")
    parser.add_argument("--exclude", nargs="+", default=(), metavar="NAME", help="layers to leave alone (same syntax)")


def target_spec(values: list[str] | None, option: str = "--targets") -> str | tuple[str, ...] | None:
    """``--targets`` (or ``--exclude``) values as a PEFT ``target_modules`` spec: a regex string
    or a tuple of names; None for no values. A regex that does not compile is refused, naming ``option``."""
    if not values:
        return None
    if len(values) == 1 and _REGEX_CHARACTERS & set(values[0]):
        try:
            re.compile(values[0])
        except re.error as exc:
            raise ValueError(f"{option} {values[0]!r} is not a valid regular expression ({exc}); pass names, or escape the special characters") from None
        return values[0]
    return tuple(values)


def add_rank_options(parser: argparse.ArgumentParser, *, params: bool, rank_help: str = "per layer: this rank") -> argparse._MutuallyExclusiveGroup:
    """The rank vocabulary as mutually exclusive options: ``--rank``, ``--energy``, ``--error``
    (and ``--params`` when a parameter budget applies)."""
    size = parser.add_mutually_exclusive_group()
    if params:
        size.add_argument("--params", type=_fractions, metavar="FRACTION[,FRACTION...]",
                          help="fraction of the targeted parameters to keep; several (0.5,0.6,0.7) write one output each")
    size.add_argument("--rank", type=positive_int, help=rank_help)
    size.add_argument("--energy", type=_fraction, help="per layer: the smallest rank keeping this fraction of the (whitened) spectral energy")
    size.add_argument("--error", type=relative_error, help="per layer: the smallest rank whose relative (whitened) error is at most this")
    return size


def rank_from_options(args: argparse.Namespace) -> Any:
    """The rank spec the options name (an int, ``Energy`` or ``ErrorTol``), or None."""
    from ..linalg import Energy, ErrorTol

    if getattr(args, "energy", None) is not None:
        return Energy(args.energy)
    if getattr(args, "error", None) is not None:
        return ErrorTol(args.error)
    return getattr(args, "rank", None)


def add_output_options(parser: argparse.ArgumentParser, *, json_help: str = "also write the result as JSON to FILE ('-': standard output)") -> None:
    """``--json FILE`` and ``--no-progress``."""
    parser.add_argument("--json", metavar="FILE", help=json_help)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars and progress log lines")


def progress_option(args: argparse.Namespace) -> bool:
    """``progress=`` for the library calls: on unless ``--no-progress``. Off a terminal, progress
    comes as log lines, so the ``svdkit`` logger is let through at INFO level."""
    enabled = not getattr(args, "no_progress", False)
    if enabled and not sys.stderr.isatty():
        logging.getLogger("svdkit").setLevel(logging.INFO)
    return enabled


def table_stream(args: argparse.Namespace):
    """Where the human-readable tables go: standard output, or standard error when ``--json -``
    writes the JSON there (so that ``... --json - | jq`` reads JSON alone)."""
    return sys.stderr if getattr(args, "json", None) == "-" else sys.stdout


def write_json(destination: str | None, text: str) -> None:
    """Write ``text`` to the ``--json`` destination (``-``: standard output)."""
    if destination is None:
        return
    if destination == "-":
        sys.stdout.write(text.rstrip("\n") + "\n")
        return
    Path(destination).write_text(text.rstrip("\n") + "\n", encoding="utf-8")


def check_outputs(*, directories: tuple[str | None, ...] = (), files: tuple[str | None, ...] = (), overwrite: bool = False) -> None:
    """Refuse before any work starts: an existing output directory without ``--overwrite``, a file
    whose folder does not exist or is not writable, or a path that is a directory.

    Raises
    ------
    ValueError
        Naming the path and what is wrong with it.
    """
    for directory in filter(None, directories):
        path = Path(directory)
        if path.exists() and not overwrite:
            raise ValueError(f"{path} exists; pass --overwrite to replace it")
        if path.exists() and not path.is_dir():
            raise ValueError(f"{path} exists and is not a directory")
        _check_writable_parent(path)
    targets = {Path(d).resolve() for d in directories if d}
    for file in filter(None, files):
        if file == "-":
            continue
        path = Path(file)
        if path.resolve() in targets:
            raise ValueError(f"{path} is named as an output directory and as a file to write; give the file another name")
        if path.is_dir():
            raise ValueError(f"{path} is a directory, not a file to write")
        parent = path.resolve().parent
        if not parent.is_dir():
            raise ValueError(f"cannot write {path}: the folder {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise ValueError(f"cannot write {path}: the folder {parent} is not writable")


def _check_writable_parent(path: Path) -> None:
    parent = path.resolve().parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ValueError(f"cannot write {path}: {existing} is not a writable directory")
    if existing != parent and not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"cannot create the folder {parent} for {path}")


def positive_int(value: str) -> int:
    """An argparse type: an integer >= 1, refused with a message naming the value otherwise."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value!r}")
    return number


def _number(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None


def _fraction(value: str) -> float:
    number = _number(value)
    if not 0 < number <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {value!r}")
    return number


def _fractions(value: str) -> tuple[float, ...]:
    parts = [v.strip() for v in value.split(",") if v.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected one or more fractions in (0, 1], got {value!r}")
    return tuple(_fraction(v) for v in parts)


def relative_error(value: str) -> float:
    number = _number(value)
    if not 0 <= number < 1:
        raise argparse.ArgumentTypeError(f"expected a relative error in [0, 1), got {value!r}")
    return number
