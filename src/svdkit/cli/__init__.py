"""The ``svdkit`` command line.

Each subcommand lives in its own module of this package, which defines
``register(subparsers)`` (adding its parser, with ``set_defaults(run=...)``). Adding a command is
one module plus one line in :data:`COMMANDS`; heavy imports belong inside the ``run`` functions
so ``svdkit --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Sequence

from .. import __version__

__all__ = ["COMMANDS", "build_parser", "error_message", "main"]

COMMANDS = ("info", "compress", "heal", "eval", "lora", "analyze")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="svdkit",
        description="The singular value decomposition at work on deep networks: compress, adapt, diagnose.",
    )
    parser.add_argument("--version", action="version", version=f"svdkit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name.replace('-', '_')}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``svdkit`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    status = 1
    try:
        status = int(args.run(args) or 0)
    except (ValueError, OSError, ImportError, KeyError) as exc:
        print(f"svdkit {args.command}: error: {error_message(exc)}", file=sys.stderr)
    except RuntimeError as exc:
        distributed = sys.modules.get("svdkit.distributed")
        if distributed is None or not isinstance(exc, distributed.RankFailure):
            raise
        print(f"svdkit {args.command}: error: {exc}", file=sys.stderr)  # another rank failed: its message
    finally:
        distributed = sys.modules.get("svdkit.distributed")  # loaded only by commands that may join a group
        if distributed is not None:
            distributed.leave_group(succeeded=status == 0)
    return status


def error_message(exc: BaseException) -> str:
    """The one line the command line prints for ``exc``: an operating-system error that names no
    file (``[Errno 2] No such file or directory`` alone) says where it was raised, or that the
    working directory is gone."""
    if not isinstance(exc, OSError) or exc.errno is None or exc.filename is not None:
        return str(exc)
    try:
        os.getcwd()
    except FileNotFoundError:
        return (f"{exc}: the current working directory was removed while svdkit ran; change to an existing directory "
                "and run the command again (a healing run continues with --resume)")
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return str(exc)
    return f"{exc} (raised in {frames[-1].name}, {Path(frames[-1].filename).name} line {frames[-1].lineno})"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
