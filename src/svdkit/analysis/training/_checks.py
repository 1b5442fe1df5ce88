"""Argument checks shared by the trackers and recorders of this package."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["positive_int"]


def positive_int(value: Any, name: str, *, allow_none: bool = False) -> int | None:
    """``value`` as an int >= 1 (or None when ``allow_none``), else a ValueError naming ``name``.

    Booleans and floats are refused, even ``2.0``: a cadence given as a float is a mistake.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)
