"""The two ends that every svdkit report shares: JSON text (written to a file when asked) and pandas.

Each report (compression, extraction, weight spectra, analysis tables, training histories) has
``to_table()`` / ``to_dict()`` / ``to_json(path=None, *, indent=2)`` / ``to_pandas()``; the last
two end here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["json_text", "pandas"]


def json_text(data: Any, path: str | os.PathLike | None = None, *, indent: int = 2) -> str:
    """``data`` (JSON-ready) as JSON text; also written, with a final newline, to ``path`` when given."""
    text = json.dumps(data, indent=indent)
    if path is not None:
        Path(path).write_text(text + "\n", encoding="utf-8")
    return text


def pandas():
    """The ``pandas`` module.

    Raises
    ------
    ImportError
        Without pandas, saying how to install it.
    """
    try:
        import pandas as pd
    except ImportError as exc:
        raise ImportError("to_pandas needs pandas: pip install pandas") from exc
    return pd
