"""A safetensors checkpoint on disk, read one tensor at a time.

A checkpoint is one ``.safetensors`` file, a directory of them, or a directory of shards named by
its ``*.safetensors.index.json`` (``weight_map``: tensor name -> shard file), as transformers
writes models too large for one file. A sharded checkpoint is never read in part: a shard the
index names but the directory lacks, or a tensor the index places in a shard that does not hold
it, is an error that names them.

Files are memory-mapped by safetensors, so opening a checkpoint of any size costs no memory;
:meth:`Checkpoint.tensor` reads one tensor through a mapping of its own, released as soon as the
tensor is copied out: the pages read do not stay in the process's resident memory, so reading a
checkpoint block by block holds one block, not every block read so far.

This module also owns the parameters of a model built without memory for them: modules built
inside :func:`empty_parameters` hold ``meta`` parameters; :func:`materialize` gives them their
tensors from a checkpoint and :func:`release` empties them again.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

__all__ = ["Checkpoint", "checkpoint_files", "empty_parameters", "materialize", "read_index", "release"]


def read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a shard index (tensor name -> shard file name)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot read the shard index {str(index)!r} (expected JSON with a 'weight_map'): {exc}") from exc
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"the shard index {str(index)!r} has a 'weight_map' that is not a mapping of tensor names to file names")
    return weight_map


def checkpoint_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The files to read and, for a sharded checkpoint, the index's tensor -> shard map.

    Raises
    ------
    FileNotFoundError
        No such path, no ``.safetensors`` file in the directory, or shards that the index names
        but the directory lacks (every one is named, with how many tensors it holds).
    ValueError
        Several indexes, or an unreadable one.
    """
    if path.is_file():
        return [path], None
    if not path.is_dir():
        raise FileNotFoundError(f"no safetensors file or directory at {str(path)!r}")
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise ValueError(f"{str(path)!r} holds {len(indexes)} safetensors indexes ({', '.join(p.name for p in indexes)}); pass one shard or a directory with one index")
    if indexes:
        weight_map = read_index(indexes[0])
        shards = sorted(set(weight_map.values()))
        missing = [name for name in shards if not (path / name).is_file()]
        if missing:
            counts = {name: sum(1 for v in weight_map.values() if v == name) for name in missing}
            listed = ", ".join(f"{name} ({counts[name]} tensors)" for name in missing)
            raise FileNotFoundError(
                f"{indexes[0].name} in {str(path)!r} names {len(shards)} shards, {len(missing)} of them missing: {listed}; "
                "reading it would be partial (download the missing shards, or pass the present ones one by one)"
            )
        return [path / name for name in shards], weight_map
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in the directory {str(path)!r}")
    return files, None


class Checkpoint:
    """The tensors of a safetensors checkpoint, by name (see the module docstring).

    Use as a context manager, or call :meth:`close`.

    Parameters
    ----------
    path : str or PathLike
        A ``.safetensors`` file or a directory.

    Raises
    ------
    FileNotFoundError, ValueError
        See :func:`checkpoint_files`; also a file that safetensors cannot read, or a shard that
        lacks tensors the index places there (naming them).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        try:
            from safetensors import safe_open
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("reading .safetensors files needs safetensors: pip install 'svdkit[hf]'") from exc
        self.path = Path(path)
        self._open = safe_open
        self._stack = contextlib.ExitStack()
        self._where: dict[str, tuple[Any, Path]] = {}
        self.files, weight_map = checkpoint_files(self.path)
        try:
            for file in self.files:
                try:
                    handle = self._stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
                    keys = list(handle.keys())
                except Exception as exc:  # safetensors raises its own error types for corrupt headers
                    raise ValueError(f"cannot read {str(file)!r} as a safetensors file: {exc}") from exc
                if weight_map is not None:
                    absent = sorted(set(k for k, v in weight_map.items() if v == file.name) - set(keys))
                    if absent:
                        raise ValueError(
                            f"{file.name} lacks {len(absent)} tensor(s) that the index places there: "
                            f"{', '.join(absent[:8])}{' ...' if len(absent) > 8 else ''}; the shard is incomplete or from another checkpoint"
                        )
                for key in keys:
                    self._where.setdefault(key, (handle, file))
        except BaseException:
            self._stack.close()
            raise

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def keys(self) -> list[str]:
        """Every tensor name, in file order."""
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def items(self) -> Iterator[tuple[str, Any, Path]]:
        """(name, safetensors slice, file) of every tensor, read nothing."""
        for key, (handle, file) in self._where.items():
            yield key, handle.get_slice(key), file

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of a tensor, from its file's header (nothing is read)."""
        if key not in self._where:
            raise KeyError(f"{self.path} holds no tensor {key!r}")
        handle, _ = self._where[key]
        return tuple(int(d) for d in handle.get_slice(key).get_shape())

    def file_of(self, key: str) -> Path:
        """The file that holds a tensor."""
        if key not in self._where:
            raise KeyError(f"{self.path} holds no tensor {key!r}")
        return self._where[key][1]

    def check_fits(self, module: torch.nn.Module, *, prefix: str = "") -> None:
        """Refuse, before anything is read, a checkpoint that lacks a parameter of ``module``
        (``prefix + name``) or holds it in another shape.

        Raises
        ------
        ValueError
            Naming each missing tensor, and each tensor of the wrong shape with its file, the
            shape found and the shape the model expects.
        """
        missing, wrong = [], []
        for name, param in module.named_parameters():  # a tied parameter is listed once
            key = prefix + name
            if key not in self._where:
                missing.append(key)
            elif self.shape(key) != tuple(param.shape):
                wrong.append(f"{key} in {self.file_of(key).name} has shape {self.shape(key)}, the model expects {tuple(param.shape)}")
        parts = []
        if missing:
            known = {prefix + name for name, _ in module.named_parameters(remove_duplicate=False)}
            foreign = [key for key in self._where if key.startswith(prefix) and key not in known]
            why = ("(complete the checkpoint: a shard or tensor is missing)" if not foreign else
                   f"(it holds tensors the model has no parameter for, e.g. {', '.join(foreign[:3])}: transformers renames or merges "
                   "such checkpoints when it loads them, a mixture's per-expert weights into fused ones, which reading tensor by "
                   "tensor does not do: compress it in memory, without --stream)")
            parts.append(f"it lacks {len(missing)} tensor(s): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''} {why}")
        if wrong:
            parts.append("; ".join(wrong[:8]) + (f" (and {len(wrong) - 8} more)" if len(wrong) > 8 else "")
                         + " (is the checkpoint from another model, or does its config.json describe another size?)")
        if parts:
            raise ValueError(f"the checkpoint {str(self.path)!r} does not fit {type(module).__name__}: {'; '.join(parts)}")

    def tensor(self, key: str, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
               shape: tuple[int, ...] | torch.Size | None = None) -> torch.Tensor:
        """One tensor, read from its file (and moved to ``device`` / cast to ``dtype``).

        ``shape``: the shape the caller expects; a tensor of another shape is refused (naming the
        tensor, its file and both shapes) before it is read.
        """
        if key not in self._where:
            raise KeyError(f"{self.path} holds no tensor {key!r}")
        _, file = self._where[key]
        if shape is not None and self.shape(key) != tuple(shape):
            raise ValueError(
                f"tensor {key!r} in {str(file)!r} has shape {self.shape(key)}, but the model expects {tuple(shape)}: "
                "the checkpoint is from another model, or its config.json describes another size"
            )
        try:
            # A fresh mapping, closed after the copy: the open handle's mapping would keep every
            # page read resident for as long as the checkpoint is open.
            with self._open(str(file), framework="pt", device="cpu") as handle:
                tensor = handle.get_tensor(key)
        except Exception as exc:
            raise ValueError(f"cannot read tensor {key!r} from {str(file)!r}: {exc}") from exc
        return tensor.to(device=device, dtype=dtype) if device is not None or dtype is not None else tensor


@contextlib.contextmanager
def empty_parameters() -> Iterator[None]:
    """Within this context, new modules get their parameters on the ``meta`` device (no memory);
    buffers stay real, so buffers computed at construction (rotary frequencies) are kept."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def materialize(module: nn.Module, checkpoint: Checkpoint, prefix: str = "", *, device: torch.device | str | None = None,
                skip: str | None = None) -> None:
    """Give every empty (``meta``) parameter of ``module`` its tensor ``prefix + name`` from
    ``checkpoint``, in place (a parameter tied to another is read once).

    Parameters
    ----------
    module : nn.Module
    checkpoint : Checkpoint
    prefix : str
        The module's name in the checkpoint, with a trailing dot (e.g. ``"model.layers.3."``).
    device : optional
        Where the tensors go (default: the CPU).
    skip : str, optional
        Leave the parameters whose names start with it empty (e.g. the blocks, read one at a time).

    Raises
    ------
    KeyError
        A tensor the checkpoint does not hold.
    ValueError
        A tensor whose shape differs from the parameter's, naming both and the file.
    """
    placed = set()
    for owner_name, owner in module.named_modules():  # modules that know where their tensors are (an ExpertBank)
        read_own = getattr(owner, "materialize_from", None)
        if read_own is None or (skip is not None and owner_name.startswith(skip)):
            continue
        path = f"{owner_name}." if owner_name else ""
        if any(p.is_meta for p in owner.parameters()):
            read_own(lambda key, path=path: checkpoint.tensor(prefix + path + key, device=device or "cpu"))
        placed.update(path + n for n, _ in owner.named_parameters())
    for name, param in list(module.named_parameters()):
        if not param.is_meta or (skip is not None and name.startswith(skip)) or name in placed:
            continue
        key = prefix + name
        tensor = checkpoint.tensor(key, device=device or "cpu")
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(
                f"tensor {key!r} in {checkpoint.file_of(key)} has shape {tuple(tensor.shape)}, but the model's config "
                f"makes it {tuple(param.shape)}: the checkpoint and its config.json do not match"
            )
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        owner._parameters[attr] = nn.Parameter(tensor, requires_grad=param.requires_grad)


def release(module: nn.Module) -> None:
    """Empty every parameter of ``module`` again (``meta`` tensors of the same shape and dtype)."""
    for owner in module.modules():
        for attr, param in list(owner._parameters.items()):
            if param is not None and not param.is_meta:
                owner._parameters[attr] = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
