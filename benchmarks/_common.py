"""Helpers shared by the benchmark scripts: timing, machine description, tables, JSON."""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Any, Callable, Sequence

import torch


def sync(device: torch.device | str) -> None:
    """Wait for queued kernels on ``device`` (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def best_of(fn: Callable[[], Any], repeats: int, *, warmup: int = 1, device: str = "cpu") -> tuple[float, Any]:
    """Best wall-clock time of ``repeats`` calls after ``warmup`` untimed ones, and the last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    sync(device)
    best = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best, out


def best_of_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, *, warmup: int = 1, device: str = "cpu") -> dict[str, tuple[float, Any]]:
    """Best time and last result of each function, timed round-robin.

    On a machine shared with other jobs the load drifts; timing the candidates in turn, ``repeats``
    rounds of one call each, gives every one of them the same chance at the quiet moments, so the
    ratios between them stay meaningful.
    """
    out: dict[str, Any] = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            out[name] = fn()
    sync(device)
    best = {name: float("inf") for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            start = time.perf_counter()
            out[name] = fn()
            sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: (best[name], out.get(name)) for name in fns}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on."""
    import numpy

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": device,
    }
    try:
        from threadpoolctl import threadpool_info

        info["blas_threads"] = {f"{d['internal_api']} ({d.get('prefix', '')})": d["num_threads"] for d in threadpool_info()}
    except ImportError:
        pass
    try:
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"1024x1024,4096x11008"`` -> ``[(1024, 1024), (4096, 11008)]``."""
    shapes = []
    for item in text.split(","):
        m, n = item.lower().split("x")
        shapes.append((int(m), int(n)))
    return shapes


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A Markdown table; ``columns`` holds (key, header, format spec) triples."""

    def cell(row: dict[str, Any], key: str, spec: str) -> str:
        value = row.get(key)
        if value is None:
            return ""
        return format(value, spec) if spec else str(value)

    header = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(cell(r, k, s) for k, _, s in columns) + " |" for r in rows]
    return "\n".join([header, rule, *body])


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON to ``path``; nothing when ``path`` is None."""
    if path is None:
        return
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
