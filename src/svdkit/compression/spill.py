"""Tensors kept on disk between the passes of the block-by-block pipeline."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from ..calibrate import GramStats

__all__ = ["Spill"]


class Spill:
    """Tensors kept on disk between passes, one file per key: in a temporary directory removed
    when closed, or in ``path`` (kept, for a run that may be resumed)."""

    def __init__(self, path: Path | None = None) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="svdkit-") if path is None else None
        self.path = Path(self._dir.name) if self._dir is not None else Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def put(self, key: str, value: Any) -> None:
        torch.save(value, self.path / f"{key}.pt")

    def put_statistics(self, key: str, stats: dict[str, GramStats]) -> None:
        """Keep gradient statistics for pass 2 in float32 (half the disk traffic): pass 2 reads only
        their whitening factors, which a relative damping of 1e-2 makes insensitive to 1e-7
        rounding."""
        light = {}
        for name, s in stats.items():
            kept = GramStats(s.gram.float(), s.abs_sum.float(), s.count)
            kept._whitening.update({d: (L.float(), used) for d, (L, used) in s._whitening.items()})
            light[name] = kept
        self.put(key, light)

    def get(self, key: str) -> Any:
        return torch.load(self.path / f"{key}.pt", map_location="cpu", weights_only=False)

    def drop(self, key: str) -> None:
        (self.path / f"{key}.pt").unlink(missing_ok=True)

    def close(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
