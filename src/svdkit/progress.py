"""Progress on long work, one knob everywhere: ``progress=`` takes a bool or a tqdm-like callable.

==========================  ==================================================================
``progress=False`` / None   nothing is shown
``progress=True``           a tqdm bar on a terminal (when tqdm is installed), otherwise
                            INFO lines on the ``svdkit`` logger at about every tenth of the
                            work, so logs of batch jobs show where a long run is
a callable                  called as ``progress(iterable, desc=..., total=...)``, the
                            signature of ``tqdm.tqdm``, and iterated over
==========================  ==================================================================
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Callable, Iterable, Iterator, TypeVar

__all__ = ["ProgressLike", "track"]

T = TypeVar("T")
ProgressLike = bool | Callable[..., Iterable[Any]] | None

logger = logging.getLogger("svdkit")


def track(iterable: Iterable[T], progress: ProgressLike, *, desc: str, total: int | None = None) -> Iterable[T]:
    """Wrap ``iterable`` so that iterating it shows progress as ``progress`` asks.

    Parameters
    ----------
    iterable : iterable
    progress : bool, callable or None
        See the module docstring.
    desc : str
        What is being done, e.g. ``"calibration batches"``.
    total : int, optional
        Number of items, when ``iterable`` has no ``len``.

    Returns
    -------
    iterable
        Yields the same items in the same order.
    """
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if callable(progress):
        return progress(iterable, desc=desc, total=total)
    if not progress:
        return iterable
    if sys.stderr.isatty():
        try:
            from tqdm.auto import tqdm
        except ImportError:
            pass
        else:
            return tqdm(iterable, desc=desc, total=total, leave=False, file=sys.stderr)
    return _log_lines(iterable, desc, total)


def _log_lines(iterable: Iterable[T], desc: str, total: int | None) -> Iterator[T]:
    start = time.perf_counter()
    step = max(1, (total or 10) // 10)
    done = 0
    for item in iterable:
        yield item
        done += 1
        if done % step == 0 or done == total:
            of = f"/{total}" if total else ""
            logger.info("%s: %d%s (%.1f s)", desc, done, of, time.perf_counter() - start)
