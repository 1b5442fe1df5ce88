"""The activation-aware verdict: svdkit's one rule applied to each layer's input-whitened spectrum.

A layer ``y = W x`` with input second moment ``E[x x^T] = L L^T`` has ``E||(W - W_k) x||**2 =
||(W - W_k) L||_F**2``: truncating the SVD of ``W L`` is what minimises its output error on the
data (SVD-LLM, arXiv:2403.07378), which is how svdkit's ``whiten`` and ``fisher`` compression
choose their factors. So the same rule (:func:`svdkit.linalg.compression_suitability`) applied to
the singular values of ``W L`` says whether activation-aware compression can factorize the
layer, while the plain verdict judges plain truncation only. On all-MiniLM-L6-v2 the two tell
compression's story: plain truncation is poor, whitened is good.

The input Grams come from :func:`svdkit.calibrate.collect_input_stats` and ``L`` from
:func:`svdkit.linalg.cholesky_factor` with compression's damping (``1e-6`` of the mean
diagonal, raised until the factorization succeeds).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..calibrate import collect_input_stats
from ..linalg import cholesky_factor
from ..linalg import DEFAULT_VERDICT_ERROR, verdict_rule
from ..progress import ProgressLike
from ..views import get_view, weight_matrix
from .esd import eigenvalues, single_threaded
from .metrics import verdict_columns

__all__ = ["DAMPING", "add_whitened_verdicts", "calibration_batches"]

#: Relative damping of the input Gram, as compression's default.
DAMPING = 1e-6
_TEXT_BATCH = 32


def calibration_batches(model: Any, data: Any, forward: Callable | None) -> tuple[nn.Module, Any, Callable | None]:
    """(module, batches, forward) for ``data``: strings go through a LoadedModel in batches of 32.

    Raises
    ------
    ValueError
        For ``data=None``.
    TypeError
        For strings without a model that tokenizes them.
    """
    if data is None:
        raise ValueError("no calibration data: pass a list of strings (with a loaded model), tensors, or dicts of tensors")
    module = model.module if not isinstance(model, nn.Module) and isinstance(getattr(model, "module", None), nn.Module) else model
    if isinstance(data, (list, tuple)) and data and isinstance(data[0], str):
        if not hasattr(model, "tokenize"):
            raise TypeError("lists of strings need a model loaded with svdkit.models.load_model (it tokenizes them)")
        texts = sorted(data, key=len)  # similar lengths waste little on padding; order does not matter
        return module, [texts[i:i + _TEXT_BATCH] for i in range(0, len(texts), _TEXT_BATCH)], forward or model.forward
    if forward is None and not isinstance(model, nn.Module) and hasattr(model, "forward"):
        forward = model.forward
    return module, data, forward


def add_whitened_verdicts(
    model: Any,
    records: list[dict[str, Any]],
    data: Any,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    error: float | None = DEFAULT_VERDICT_ERROR,
    *,
    progress: ProgressLike = False,
) -> dict[str, Any]:
    """Add ``whitened_verdict_rank``, ``whitened_verdict_params`` and ``whitened_verdict`` to the
    matrix-view records of Linear, Conv1D and Conv2d layers (in place).

    Parameters
    ----------
    model : nn.Module or LoadedModel
    records : list of dict
        Weight-table records (``name``, ``kind``, ``view``).
    data : iterable of batches
        Calibration data (see :func:`calibration_batches`).
    forward : callable, optional
        ``forward(module, batch) -> output`` runs the model on one batch.
    error : float or None
        The rule's relative error (of the layer's output on the data); None: nothing is added.
    progress : bool or callable
        Progress over the calibration batches.

    Returns
    -------
    dict
        For ``table.meta["whitened"]``: the rule in words, the damping, the layers judged.

    Raises
    ------
    ValueError
        For missing data, a batch that gives NaN/Inf inputs (naming the batch and the first
        layer), a batch the model cannot run (naming the batch), or a layer the data never reaches.
    """
    if error is None:
        return {}
    module, batches, forward = calibration_batches(model, data, forward)
    wanted = {r["name"] for r in records if r.get("view", "matrix") == "matrix" and r.get("kind") in ("linear", "conv1d", "conv2d", "dense")}
    targets = [(name, mod) for name, mod in module.named_modules()
               if name in wanted and get_view(mod) is not None and get_view(mod).kind != "embedding"]
    if not targets:
        return {"rule": verdict_rule(error), "layers": 0}
    stats = collect_input_stats(module, targets, batches, forward, progress=progress)
    with single_threaded():  # small per-layer problems: threads only contend
        judged = _judge(module, records, stats, error)
    return {
        "rule": "the same rule on the singular values of W L, L L^T = E[x x^T] over the calibration data (the layer's output error)",
        "damping": DAMPING,
        "layers": judged,
    }


def _judge(module: nn.Module, records: list[dict[str, Any]], stats: dict, error: float) -> int:
    judged = 0
    for record in records:
        name = record["name"]
        if name not in stats or record.get("view", "matrix") != "matrix":
            continue
        W = weight_matrix(module.get_submodule(name)).detach().to(torch.float64)
        gram = stats[name].gram / max(stats[name].count, 1)
        try:
            L, _ = cholesky_factor(gram.to(W.device), damping=DAMPING)
        except (torch.linalg.LinAlgError, ValueError) as exc:
            record.update(whitened_verdict_rank=None, whitened_verdict_params=None, whitened_verdict="", whitened_note=str(exc))
            continue
        S = eigenvalues(W @ L, "gram").sqrt().cpu().numpy()
        record.update(verdict_columns(S, tuple(W.shape), error, prefix="whitened_"))
        judged += 1
    return judged

