"""Which ranks make a factorized Linear faster than the dense one, measured on the device.

A rank-``k`` factorization of an ``m x n`` Linear stores and multiplies ``k (m + n)`` numbers
instead of ``m n``, so it saves below the break-even rank ``m n / (m + n)``; but it runs two thin
products instead of one, each with its own call overhead, its intermediate activations and thin
shapes that a kernel uses less well. So it is faster than the dense layer only below some rank
that depends on the device, the dtype, the threads and the number of tokens in flight
(REFERENCES 2.1, 7.3).

:class:`MeasuredCosts` measures it. For each shape ``(m, n)`` and each token count of the
:class:`SpeedTarget` (by default decode at 1, 8 and 32 tokens and a prefill of 8 x 512), it times
the dense product and the factorized pair at five ranks between 0.3 and 1 times the break-even
rank, on weights that do not fit in the last-level cache (enough copies of them, taken in turn,
so every product reads its weights from memory as a model's layers do), each candidate once per
round, the best of the rounds. The factorized time is nearly linear in the rank (bytes and flops
grow with ``k``), so a straight line fitted through the five points gives the rank where it meets
the dense time, less a safety ``margin``: the largest rank faster than dense at that token count.
The layer's cap is the smallest of them over the token counts.

Measurements are cached per shape in a JSON file under the user's cache directory
(``$SVDKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/svdkit``, else ``~/.cache/svdkit``), one file per
key: the device (CPU model or GPU name), the dtype, the threads and the torch version; each entry
records the load average it was measured under. A machine busy with other jobs gives noisy
times: measure on a quiet one (:func:`measure_shapes`) and the cache serves later compressions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import torch
import torch.nn.functional as F

from ..files import write_atomic
from .timing import best_times, threads

__all__ = [
    "DEFAULT_MARGIN",
    "DEFAULT_RANK_MULTIPLE",
    "TOKENS",
    "CostModel",
    "MeasuredCosts",
    "SpeedTarget",
    "TokenTimes",
    "cache_directory",
    "cost_model",
    "default_rank_multiple",
    "describe_device",
    "measure_shapes",
    "using_costs",
]

logger = logging.getLogger(__name__)

TOKENS = (1, 8, 32, 4096)  # decode at batch 1, 8 and 32; a prefill of 8 x 512 tokens
DEFAULT_MARGIN = 0.02
# Odd sizes can run far slower than aligned ones (REFERENCES 7.3; pytorch #146817): 8 suits CPU
# SIMD widths and GPU tensor cores for 16-bit types. A choice, not a measurement of this
# repository: benchmarks/speed_llm.py times the models it gives.
DEFAULT_RANK_MULTIPLE = {"cpu": 8, "cuda": 8}
RANK_FRACTIONS = (0.3, 0.55, 0.75, 0.9, 1.0)  # of the break-even rank, where the factorized pair is timed
PREFILL_WORK = 2 ** 32  # m * n * tokens above which a prefill is timed on fewer tokens (compute-bound already)
CACHE_FORMAT = 1


def default_rank_multiple(device_type: str, shape: Sequence[int] | None = None) -> int:
    """The rank multiple that suits a device type (:data:`DEFAULT_RANK_MULTIPLE`; 1 for others);
    with ``shape`` (m, n), 1 where the break-even rank ``m n / (m + n)`` is below 16 multiples
    (small layers, whose ranks a multiple would coarsen and whose speed it does not change)."""
    multiple = DEFAULT_RANK_MULTIPLE.get(torch.device(device_type).type, 1)
    if shape is not None:
        m, n = int(shape[0]), int(shape[1])
        if m * n / (m + n) < 16 * multiple:
            return 1
    return multiple


def describe_device(device: torch.device | str) -> str:
    """What runs the products: the CPU model and its logical CPUs, or the GPU's name."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    name = "unknown CPU"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    return f"{device.type}: {name} ({os.cpu_count()} logical CPUs, {torch.backends.cpu.get_cpu_capability()})"


@dataclass(frozen=True)
class SpeedTarget:
    """Where and how a model will run, for the cost model.

    Parameters
    ----------
    device : str
        ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...
    dtype : str
        A floating-point dtype name (``"float32"``, ``"bfloat16"``, ``"float16"``).
    threads : int, optional
        CPU threads (None: ``torch.get_num_threads()`` when the target is made).
    tokens : tuple of int
        The token counts that matter: a layer is faster only if it is faster at every one.
    margin : float
        How much faster than dense (a fraction of the dense time) a factorized layer must be
        predicted to be: a guard against timing noise.
    """

    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    tokens: tuple[int, ...] = TOKENS
    margin: float = DEFAULT_MARGIN

    def __post_init__(self) -> None:
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"SpeedTarget device: {exc}") from None
        dtype = getattr(torch, str(self.dtype).removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"SpeedTarget dtype: expected a floating-point dtype name such as 'float32' or 'bfloat16', got {self.dtype!r}")
        object.__setattr__(self, "dtype", str(dtype).removeprefix("torch."))
        threads = torch.get_num_threads() if self.threads is None else self.threads
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"SpeedTarget threads: expected an int >= 1, got {self.threads!r}")
        object.__setattr__(self, "threads", threads)
        tokens = tuple(self.tokens)
        if not tokens or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in tokens):
            raise ValueError(f"SpeedTarget tokens: expected token counts >= 1, got {self.tokens!r}")
        object.__setattr__(self, "tokens", tokens)
        if isinstance(self.margin, bool) or not isinstance(self.margin, (int, float)) or not 0 <= self.margin < 1:
            raise ValueError(f"SpeedTarget margin: expected a fraction in [0, 1), got {self.margin!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @classmethod
    def of_model(cls, model: torch.nn.Module, **overrides: Any) -> "SpeedTarget":
        """The target a model runs on now: its parameters' device and floating-point dtype, the
        threads torch uses."""
        floating = [p for p in model.parameters() if p.is_floating_point() and p.device.type != "meta"]
        device = str(floating[0].device) if floating else "cpu"
        dtype = str(floating[0].dtype).removeprefix("torch.") if floating else "float32"
        return cls(**{"device": device, "dtype": dtype, **overrides})

    def key(self) -> dict[str, Any]:
        """What the measurements depend on (the cache key)."""
        return {"device": describe_device(self.device), "dtype": self.dtype, "threads": self.threads,
                "torch": torch.__version__, "format": CACHE_FORMAT}

    def describe(self) -> str:
        device = torch.device(self.device)
        where = f"{self.threads} thread{'s' if self.threads != 1 else ''}" if device.type == "cpu" else str(device)
        return f"{device.type}, {self.dtype}, {where}"


@dataclass
class TokenTimes:
    """Times of one shape at one token count, in seconds per product.

    Attributes
    ----------
    tokens : int
        The token count this stands for.
    measured_tokens : int
        The token count timed (fewer for a large compute-bound prefill, see :data:`PREFILL_WORK`).
    dense : float
    factorized : dict of int -> float
        Rank -> time of the factorized pair.
    load_average : float or None
        The machine's one-minute load average when measured.
    """

    tokens: int
    measured_tokens: int
    dense: float
    factorized: dict[int, float]
    load_average: float | None = None

    def largest_faster_rank(self, margin: float, limit: int) -> int:
        """The largest rank (at most ``limit``) predicted to run at most ``1 - margin`` of the
        dense time: where the line through the factorized times meets that time (0: none).

        The line is the Theil-Sen fit (the median of the slopes between pairs of points, the
        median intercept), which one disturbed point out of five does not move.
        """
        threshold = self.dense * (1 - margin)
        points = sorted(self.factorized.items())
        slopes = sorted((t2 - t1) / (k2 - k1) for i, (k1, t1) in enumerate(points) for k2, t2 in points[i + 1:] if k2 != k1)
        slope = slopes[len(slopes) // 2] if slopes else 0.0
        if slope > 0:
            intercepts = sorted(t - slope * k for k, t in points)
            intercept = intercepts[len(intercepts) // 2]
            rank = math.floor((threshold - intercept) / slope)
        else:  # times that do not grow with the rank (noise): the largest measured rank under the threshold
            rank = max((k for k, t in points if t <= threshold), default=0)
        return int(min(max(rank, 0), limit))


class CostModel(Protocol):
    """What rank selection asks of a cost model."""

    target: SpeedTarget

    def largest_faster_rank(self, m: int, n: int) -> int:
        """The largest rank at which an ``m x n`` Linear (out x in) factorized runs faster than
        dense at every token count of the target (0: none; at most the break-even rank)."""

    def describe(self) -> str:
        """Where the numbers come from, for report notes."""


def cache_directory() -> Path:
    """``$SVDKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/svdkit``, else ``~/.cache/svdkit``."""
    if os.environ.get("SVDKIT_CACHE_DIR"):
        return Path(os.environ["SVDKIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "svdkit"


def _last_level_cache(device: torch.device) -> int:
    """Bytes of the device's last-level cache (32 MiB where it cannot be read)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 * 2 ** 20)
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        with contextlib.suppress(OSError, ValueError):
            text = (index / "size").read_text().strip().upper()
            scale = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes) if sizes else 32 * 2 ** 20


@dataclass
class MeasuredCosts:
    """The cost model measured on the target device (see the module docstring).

    Parameters
    ----------
    target : SpeedTarget
    directory : path, optional
        The cache directory (default :func:`cache_directory`); None entries are never written
        when ``cache`` is False.
    cache : bool
        Read and write the cache file.
    rounds : int
        Rounds of timing (each times every candidate once); the best round counts.
    """

    target: SpeedTarget = field(default_factory=SpeedTarget)
    directory: Path | None = None
    cache: bool = True
    rounds: int = 7
    _entries: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict, repr=False)
    _loaded: bool = field(default=False, repr=False)
    _warned: bool = field(default=False, repr=False)

    @property
    def path(self) -> Path:
        key = json.dumps(self.target.key(), sort_keys=True)
        return (self.directory or cache_directory()) / "speed" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"

    def describe(self) -> str:
        return f"measured on {describe_device(self.target.device)} ({self.target.describe()})"

    def _load(self) -> None:
        if self._loaded or not self.cache:
            return
        self._loaded = True
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("key") == self.target.key():
                self._entries = data.get("shapes", {})

    def _save(self) -> None:
        if not self.cache:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        entries: dict[str, dict[str, Any]] = {}
        with contextlib.suppress(OSError, ValueError):  # keep what another process measured meanwhile
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("key") == self.target.key():
                entries = data.get("shapes", {})
        for shape, per_tokens in self._entries.items():
            entries.setdefault(shape, {}).update(per_tokens)
        self._entries = entries
        text = json.dumps({"key": self.target.key(), "shapes": entries}, indent=1, sort_keys=True)
        write_atomic(self.path, lambda t: t.write_text(text, encoding="utf-8"))

    def times(self, m: int, n: int, tokens: int) -> TokenTimes:
        """The times of an ``m x n`` Linear at ``tokens`` tokens (measured once, then cached)."""
        self._load()
        entry = self._entries.get(f"{m}x{n}", {}).get(str(tokens))
        if entry is None:
            entry = asdict(self._measure(m, n, tokens))
            self._entries.setdefault(f"{m}x{n}", {})[str(tokens)] = entry
            self._save()
        return TokenTimes(int(entry["tokens"]), int(entry["measured_tokens"]), float(entry["dense"]),
                          {int(k): float(v) for k, v in entry["factorized"].items()}, entry.get("load_average"))

    def largest_faster_rank(self, m: int, n: int) -> int:
        limit = math.floor(m * n / (m + n))
        return min(self.times(m, n, tokens).largest_faster_rank(self.target.margin, limit) for tokens in self.target.tokens)

    def _measure(self, m: int, n: int, tokens: int) -> TokenTimes:
        device, dtype = torch.device(self.target.device), self.target.torch_dtype
        measured = tokens if m * n * tokens <= PREFILL_WORK else max(256, PREFILL_WORK // (m * n))
        measured = min(measured, tokens)
        multiple = default_rank_multiple(device.type, (m, n))
        breakeven = m * n / (m + n)
        ranks = sorted({max(multiple, round(f * breakeven / multiple) * multiple) for f in RANK_FRACTIONS})
        element = torch.finfo(dtype).bits // 8
        spread = 1.5 * _last_level_cache(device)  # bytes each candidate's copies span
        generator = torch.Generator(device="cpu").manual_seed(0)

        def copies(shapes: list[tuple[int, int]]) -> list[list[torch.Tensor]]:
            size = sum(a * b for a, b in shapes) * element
            count = 1 if measured > 64 else int(min(64, max(1, math.ceil(spread / size))))
            return [[(torch.randn(a, b, generator=generator) / b ** 0.5).to(device, dtype) for a, b in shapes] for _ in range(count)]

        x = torch.randn(measured, n, generator=generator).to(device, dtype)
        dense = copies([(m, n)])
        pairs = {k: copies([(k, n), (m, k)]) for k in ranks}

        def run_dense() -> None:
            for (w,) in dense:
                F.linear(x, w)

        def run_pair(sets: list[list[torch.Tensor]]) -> None:
            for v, u in sets:
                F.linear(F.linear(x, v), u)

        fns = {"dense": run_dense, **{str(k): (lambda sets=sets: run_pair(sets)) for k, sets in pairs.items()}}
        logger.info("timing a %dx%d Linear at %d tokens on %s", m, n, measured, self.target.describe())
        with torch.inference_mode(), threads(self.target.threads if device.type == "cpu" else None):
            best = best_times(fns, self.rounds, device=device)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        if load is not None and device.type == "cpu" and load > (os.cpu_count() or 1) and not self._warned:
            self._warned = True  # once per cost model: every entry records its load average
            logger.warning("timed a %dx%d Linear under a load average of %.1f on %d CPUs: the times are noisy; measure on a quiet "
                           "machine (remove %s to measure again)", m, n, load, os.cpu_count() or 1, self.path)
        return TokenTimes(tokens, measured, best["dense"] / len(dense),
                          {k: best[str(k)] / len(pairs[k]) for k in ranks}, None if load is None else round(load, 2))


def measure_shapes(shapes: Sequence[tuple[int, int]], target: SpeedTarget | None = None) -> dict[tuple[int, int], int]:
    """Measure (or read from the cache) every shape, and each one's largest rank faster than dense."""
    costs = cost_model(target or SpeedTarget())
    return {(int(m), int(n)): costs.largest_faster_rank(int(m), int(n)) for m, n in dict.fromkeys(map(tuple, shapes))}


_OVERRIDES: list[CostModel | None] = []


@contextlib.contextmanager
def using_costs(costs: CostModel | None) -> Iterator[None]:
    """Use ``costs`` wherever a cost model is asked for (None: none, so no rank is capped)
    inside the block, e.g. a model measured elsewhere, or fixed caps in tests."""
    _OVERRIDES.append(costs)
    try:
        yield
    finally:
        _OVERRIDES.pop()


_MEASURED: dict[SpeedTarget, MeasuredCosts] = {}


def cost_model(target: SpeedTarget) -> CostModel | None:
    """The cost model for ``target``: the one :func:`using_costs` installed; else none when the
    environment variable ``SVDKIT_NO_SPEED_CAPS`` is set to a non-empty value other than ``0``
    (a test suite whose tiny models would otherwise be timed, in every process it starts); else
    the measured one (one per target and process, backed by the cache file)."""
    if _OVERRIDES:
        return _OVERRIDES[-1]
    if os.environ.get("SVDKIT_NO_SPEED_CAPS", "") not in ("", "0"):
        return None
    if target not in _MEASURED:
        _MEASURED[target] = MeasuredCosts(target)
    return _MEASURED[target]
