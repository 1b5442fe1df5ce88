"""One tensor read from a ``.pt`` file written by ``torch.save``, refused in one line otherwise."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

__all__ = ["read_tensor_file"]


def read_tensor_file(path: Path, *, holds: str) -> torch.Tensor:
    """The tensor saved in ``path`` (read with ``weights_only=True``: no code runs).

    Parameters
    ----------
    path : Path
    holds : str
        What the file must hold, for the message (e.g. ``"token ids of shape (N, L)"``).

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        A file that is not a ``torch.save`` file, one that holds Python objects other than
        tensors, or one whose object is not a tensor; one line naming the file and what it must hold.
    """
    if not path.is_file():
        raise FileNotFoundError(f"no tensor file at {str(path)!r}")
    expected = f"it must hold one tensor of {holds}, saved with torch.save(tensor, {path.name!r})"
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing the file
            warnings.simplefilter("ignore", UserWarning)
            value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip, pickle and torch raise many types (UnpicklingError, KeyError, EOFError, ...)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found:  # torch refuses to unpickle anything but tensors and plain containers
            reason = f"it holds Python objects besides tensors ({found.group(1)}), which are not read: no code from a file is run"
        else:
            reason = f"it is not a file written by torch.save, or it is damaged ({type(exc).__name__})"
        raise ValueError(f"cannot read {path}: {reason}; {expected}") from None
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{path} holds a {type(value).__name__}, not a tensor; {expected}")
    return value
