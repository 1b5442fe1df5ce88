"""What every compression entry point checks and resolves before any work: the targets, their
weights, the calibration batches, whether the model is a causal language model.

:func:`svdkit.compress` (both pipelines) and
:func:`svdkit.compression.compress_to_directory` (streamed) call these, so a bad input gets the
same message whichever path it takes, before minutes of work.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from ..distributed import Group
from ..surgery import find_targets, matches_target
from ..views import kinds
from .config import CompressConfig

__all__ = ["calibration_digest", "check_same_calibration", "check_token_batches", "check_weights", "reaches_experts",
           "select_targets"]


def select_targets(model: nn.Module, config: CompressConfig) -> list[tuple[str, nn.Module]]:
    """The layers ``config`` selects (see :func:`svdkit.surgery.find_targets`).

    Raises
    ------
    ValueError
        When no supported layer matches, naming the selection and the supported kinds.
    """
    targets = find_targets(
        model, config.target_modules, exclude_modules=config.exclude_modules, kinds=config.kinds,
        include_embeddings=config.include_embeddings, include_head=config.include_head,
    )
    if not targets:
        raise ValueError(
            f"no supported layer matched target_modules={config.target_modules!r}, "
            f"exclude_modules={config.exclude_modules!r}, kinds={config.kinds!r} (supported kinds: {', '.join(kinds())})"
        )
    return targets


def reaches_experts(config: CompressConfig, name: str) -> bool:
    """Whether the selection may reach the experts of the fused module ``name`` (a list of names
    cannot: a fused module's experts have no names until it is unfolded, so it is unfolded for a
    selection of everything or a regular expression, unless excluded)."""
    if config.exclude_modules and matches_target(name, config.exclude_modules):
        return False
    return config.target_modules is None or isinstance(config.target_modules, str)


def check_weights(targets: list[tuple[str, nn.Module]]) -> None:
    """Refuse a target whose weight or bias holds NaN or infinite values, naming it and the count."""
    for name, module in targets:
        for what in ("weight", "bias"):
            tensor = getattr(module, what, None)
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.is_meta:
                continue
            tensor = tensor.detach()
            if bool(torch.isfinite(tensor.sum())):  # the sum of finite values is finite
                continue
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise ValueError(f"layer {name} ({type(module).__name__}, {what} {tuple(tensor.shape)}) has {bad} non-finite values")


def check_token_batches(model: nn.Module, calibration: list[Any]) -> None:
    """Refuse token ids outside the vocabulary of a model that says how large it is (an
    embedding lookup would fail deep inside the forward, or silently read another row)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int):
        return
    for index, batch in enumerate(calibration):
        ids = batch.get("input_ids") if isinstance(batch, dict) else batch
        if isinstance(ids, torch.Tensor) and not ids.is_floating_point() and ids.numel():
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= vocab:
                raise ValueError(
                    f"calibration batch {index} holds token ids in [{low}, {high}], outside the model's vocabulary [0, {vocab})"
                )


def calibration_digest(batches: list[Any]) -> str:
    """SHA-256 of a calibration list: every batch's tensors (shapes and values) in order."""
    digest = hashlib.sha256()
    for batch in batches:
        tensors = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else [batch]
        for t in tensors:
            if isinstance(t, torch.Tensor):
                digest.update(str(tuple(t.shape)).encode())
                digest.update(t.detach().cpu().contiguous().numpy().tobytes())
            else:
                digest.update(repr(t).encode())
    return digest.hexdigest()


def check_same_calibration(group: Group, digest: str) -> None:
    """Every rank of ``group`` must hold the same calibration list (each then takes its share):
    ranks given different data would compress on it silently. Compares the digests before any work.

    Raises
    ------
    ValueError
        On every rank, naming the ranks whose calibration differs from rank 0's.
    """
    if not group.active:
        return
    digests = group.gather_objects(digest)
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise ValueError(
            f"the ranks were given different calibration data (ranks {differ} differ from rank 0): every rank must load the "
            "same calibration list (same --calib, --calib-seqs, --seq-len, --batch-size, --calib-seed), each takes its share"
        )
