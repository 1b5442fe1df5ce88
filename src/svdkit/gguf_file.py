"""A GGUF file checked before transformers reads it: the magic bytes and its length.

A GGUF file is a header (metadata, then each tensor's name, shape, type and offset) followed by
the tensor data. A file cut short (an interrupted download or copy) still starts like a GGUF
file, and the libraries that read it fail deep inside with messages such as numpy's "cannot
reshape array of size ...": :func:`check_gguf` reads the header with the ``gguf`` package and
says instead that the file is truncated, how long it is and how long it must be.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["check_gguf"]

MAGIC = b"GGUF"


class _Truncated(Exception):
    def __init__(self, needed: int) -> None:
        super().__init__(needed)
        self.needed = needed


def _reader_class(gguf: Any) -> type:
    """``gguf.GGUFReader`` with every read checked against the end of the file."""
    import numpy as np

    class Reader(gguf.GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):  # noqa: ANN001 - the gguf signature
            end = int(offset) + int(count) * np.empty([], dtype=dtype).itemsize
            if end > len(self.data):
                raise _Truncated(end)
            return super()._get(offset, dtype, count, override_order)

    return Reader


def check_gguf(path: Path) -> None:
    """Refuse a file that is not GGUF or is cut short.

    Parameters
    ----------
    path : Path

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        A file that does not start with the GGUF magic bytes, one shorter than its own header
        says (naming both lengths), or one whose header the ``gguf`` package cannot read.
    """
    import gguf

    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {str(path)!r}")
    with path.open("rb") as handle:
        if handle.read(4) != MAGIC:
            raise ValueError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    size = path.stat().st_size
    try:
        _reader_class(gguf)(str(path))
    except _Truncated as exc:
        raise ValueError(
            f"{path} is truncated: it holds {size:,} bytes but its header describes at least {exc.needed:,}; "
            "the download or copy was cut short: fetch the file again"
        ) from None
    except Exception as exc:  # the gguf package raises many types for a damaged header
        raise ValueError(f"{path} is a damaged GGUF file (its header cannot be read: {type(exc).__name__}: {exc}); fetch it again") from exc
