"""Timing on a shared machine: the best of several rounds, the candidates taken in turn."""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator, Mapping

import torch

__all__ = ["best_times", "synchronize", "threads"]


def synchronize(device: torch.device | str) -> None:
    """Wait for the kernels queued on ``device`` (nothing to wait for on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def best_times(fns: Mapping[str, Callable[[], Any]], rounds: int, *, device: torch.device | str = "cpu",
               warmup: int = 1) -> dict[str, float]:
    """The best wall time of each function over ``rounds`` rounds of one call each, in seconds.

    Every round calls every function once, in turn, so a drifting load (other jobs on the
    machine) reaches all of them alike and the ratios between them stay meaningful; the best
    of the rounds is the time least disturbed by others.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    best = {name: float("inf") for name in fns}
    for _ in range(max(1, rounds)):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


@contextlib.contextmanager
def threads(count: int | None) -> Iterator[None]:
    """Run with ``count`` CPU threads (None: as set), then put the setting back."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
