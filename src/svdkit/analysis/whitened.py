"""The activation-aware verdict: svdkit's one rule applied to each layer's spectrum in a compression
method's metric, computed by that method's own transform.

A layer ``y = W x`` with input second moment ``E[x x^T] = L L^T`` has ``E||(W - W_k) x||**2 =
||(W - W_k) L||_F**2``: truncating the SVD of ``W L`` is what minimises its output error on the
data (SVD-LLM, arXiv:2403.07378), which is how svdkit's ``whiten`` and ``fisher`` compression
choose their factors. So the same rule (:func:`svdkit.linalg.compression_suitability`) applied to
the singular values of ``W L`` says whether activation-aware compression can factorize the
layer, while the plain verdict judges plain truncation only. On all-MiniLM-L6-v2 the two tell
compression's story: plain truncation is poor, whitened is good.

The spectrum is not recomputed here: each layer's input Gram
(:func:`svdkit.calibrate.collect_input_stats`) goes through the registered compression method's
transform (:data:`svdkit.compression.methods.METHODS`, ``"whiten"`` by default, with
:class:`~svdkit.compression.CompressConfig`'s default options such as its damping) and
:func:`svdkit.compression.methods.transformed_spectrum`, exactly as
:meth:`svdkit.compression.compressor.LayerCompressor.spectrum` does, so the diagnosis and the
compression agree by construction. A method that needs gradients (``fisher``) is refused: the
analysis runs no backward passes. A grouped convolution is judged on its groups' pooled spectrum
``sqrt(sum_g s_{g,i}**2)`` with the per-group shape (its relative error at a uniform per-group
rank is that spectrum's tail error).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from ..calibrate import GramStats, collect_input_stats
from ..layers.lowrank import grouped_matrices
from ..linalg import DEFAULT_VERDICT_ERROR, verdict_rule
from ..progress import ProgressLike
from ..views import get_view
from ..linalg import single_threaded
from .metrics import verdict_columns

if TYPE_CHECKING:
    from ..compression.methods import Method

__all__ = ["add_whitened_verdicts", "calibration_batches", "verdict_transform", "whitened_spectra"]

_TEXT_BATCH = 32


def verdict_transform(method: str) -> tuple["Method", dict[str, Any]]:
    """The registry entry of compression method ``method`` and its options from
    :class:`~svdkit.compression.CompressConfig`'s defaults.

    Raises
    ------
    ValueError
        For an unknown method, or one that needs gradients (the analysis runs no backward passes).
    """
    from ..compression import METHODS, CompressConfig

    entry = METHODS.get(method)
    if entry is None:
        raise ValueError(f"verdict_method={method!r} is not a compression method; choose one of {sorted(METHODS)}")
    if entry.needs_gradients:
        usable = sorted(name for name, m in METHODS.items() if not m.needs_gradients)
        raise ValueError(
            f"verdict_method={method!r} needs gradients of the model's objective, which the weight analysis does not "
            f"compute; choose a method that needs only the layer inputs: {', '.join(usable)}"
        )
    defaults = CompressConfig(method=method)
    return entry, {name: getattr(defaults, name) for name in entry.options}


def whitened_spectra(module: nn.Module, stats: GramStats, method: str = "whiten") -> tuple[list[torch.Tensor], list[str]]:
    """One layer's singular values in ``method``'s metric, per group, and the transforms' notes.

    Parameters
    ----------
    module : nn.Module
        A Linear, Conv1D or Conv2d layer.
    stats : GramStats
        Its input statistics (:func:`svdkit.calibrate.collect_input_stats`).
    method : str
        See :func:`verdict_transform`.

    Returns
    -------
    values : list of Tensor of shape (min(m, n),), float64, descending
        One per group (one for all but grouped convolutions): what
        :meth:`~svdkit.compression.compressor.LayerCompressor.spectrum` gives for the layer.
    notes : list of str
        Each transform's note (a raised damping, or a fallback to plain SVD and why).
    """
    from ..compression import LayerStats
    from ..compression.methods import transformed_spectrum

    entry, options = verdict_transform(method)
    blocks = grouped_matrices(module)
    groups = blocks.shape[0]
    layer = LayerStats(stats)
    transforms = [entry.transform(blocks[g], layer.group(g, groups), **options) for g in range(groups)]
    return [transformed_spectrum(t) for t in transforms], [t.note for t in transforms if t.note]


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
    method: str = "whiten",
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
    method : str
        The compression method whose transform is judged (see :func:`verdict_transform`).
    progress : bool or callable
        Progress over the calibration batches.

    Returns
    -------
    dict
        For ``table.meta["whitened"]``: the rule in words, the method and its options, the
        layers judged.

    Raises
    ------
    ValueError
        For missing data, a method that is unknown or needs gradients, a batch that gives NaN/Inf
        inputs (naming the batch and the first layer), a batch the model cannot run (naming the
        batch), or a layer the data never reaches.
    """
    if error is None:
        return {}
    _, options = verdict_transform(method)
    module, batches, forward = calibration_batches(model, data, forward)
    wanted = {r["name"] for r in records if r.get("view", "matrix") == "matrix" and r.get("kind") in ("linear", "conv1d", "conv2d", "dense")}
    layers = [(name, mod) for name, mod in module.named_modules()
               if name in wanted and get_view(mod) is not None and get_view(mod).kind != "embedding"]
    if not layers:
        return {"rule": verdict_rule(error), "method": method, **options, "layers": 0}
    stats = collect_input_stats(module, layers, batches, forward, progress=progress)
    with single_threaded():  # small per-layer problems: threads only contend
        judged = _judge(module, records, stats, error, method)
    if method == "whiten":
        rule = "the same rule on the singular values of W L, L L^T = E[x x^T] over the calibration data (the layer's output error)"
    else:
        rule = f"the same rule on the singular values of compression method {method!r}'s transform of W on the calibration data"
    return {
        "rule": rule,
        "method": method,
        **options,
        "layers": judged,
    }


def _judge(module: nn.Module, records: list[dict[str, Any]], stats: dict, error: float, method: str) -> int:
    judged = 0
    for record in records:
        name = record["name"]
        if name not in stats or record.get("view", "matrix") != "matrix":
            continue
        layer = module.get_submodule(name)
        try:
            values, notes = whitened_spectra(layer, stats[name], method)
        except (torch.linalg.LinAlgError, ValueError) as exc:
            record.update(whitened_verdict_rank=None, whitened_verdict_params=None, whitened_verdict="", whitened_note=str(exc))
            continue
        pooled = torch.stack(values).square().sum(0).sqrt() if len(values) > 1 else values[0]
        shape = tuple(grouped_matrices(layer).shape[1:])
        record.update(verdict_columns(pooled.cpu().numpy(), shape, error, prefix="whitened_"))
        if notes:
            record["whitened_note"] = "; ".join(dict.fromkeys(notes))
        judged += 1
    return judged
