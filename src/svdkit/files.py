"""Writing files: atomically, with the permissions the umask gives, tensors as safetensors.

Every file svdkit writes into a saved model directory goes through here, so that a saved
directory is never half-written and its files can be read by whoever the umask allows, as the
files of transformers' ``save_pretrained`` can (``tempfile`` and safetensors create theirs
readable by their owner alone).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Collection, Mapping

import torch

__all__ = ["apply_umask", "current_umask", "replace_directory", "save_tensors", "write_atomic"]


def current_umask() -> int:
    """The process's file-mode creation mask: read from ``/proc/self/status`` where there is one,
    otherwise by setting it and putting it back (which other threads could see for a moment)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or a directory and everything under it) the permissions a new
    file or directory gets under the current umask: ``0o666 & ~umask`` for files, ``0o777 &
    ~umask`` for directories (0644 and 0755 under umask 022)."""
    mask = current_umask()
    path = Path(path)
    if not path.is_dir():
        os.chmod(path, 0o666 & ~mask)
        return
    os.chmod(path, 0o777 & ~mask)
    for root, directories, names in os.walk(path):
        for name in directories:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in names:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(temporary)`` to write a file beside ``path``, then rename it to ``path``.

    A reader never sees a half-written ``path``: it sees the old file or the new one. The new
    file gets the umask's permissions (see :func:`apply_umask`). A failed ``write`` leaves no
    temporary file behind.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        write(temporary)
        apply_umask(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], *, dtype: torch.dtype | None = None,
                 metadata: Mapping[str, str] | None = None, exact: Collection[str] = ()) -> None:
    """Write ``tensors`` to a safetensors file atomically.

    Parameters
    ----------
    path : path
    tensors : mapping of str -> Tensor
        A state dict taken with ``keep_vars=True``: a tensor held under several names (tied
        weights) is one object, saved once under its first name.
    dtype : torch.dtype, optional
        Cast the floating-point tensors to this dtype (integer and boolean tensors are kept).
    metadata : mapping of str -> str, optional
        The header's metadata (default ``{"format": "pt"}``; ``format`` is always ``pt``).
    exact : collection of str
        Keys never cast (a quantized weight's scales).
    """
    from safetensors.torch import save_file

    seen: set[int] = set()
    kept = {}
    for key, tensor in tensors.items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point() and key not in exact:
            tensor = tensor.to(dtype)
        kept[key] = tensor.to("cpu").contiguous()
    header = {**dict(metadata or {}), "format": "pt"}
    write_atomic(path, lambda t: save_file(kept, str(t), metadata=header))


def replace_directory(staging: Path, target: Path) -> None:
    """Move ``staging`` to ``target``; an existing ``target`` is restored if the move fails."""
    if not target.exists():
        os.replace(staging, target)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, retired / target.name)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(retired / target.name, target)
        shutil.rmtree(retired, ignore_errors=True)
        raise
    shutil.rmtree(retired, ignore_errors=True)
