"""Spectral diagnostics of weight matrices: one table row per layer, WeightWatcher-grade, fast.

Each layer's matrix ``W`` (:mod:`svdkit.views`) gives its eigenvalues ``lambda_i = s_i**2`` from
one Gram product and one symmetric eigensolve (:mod:`svdkit.analysis.esd`), and every column is
read from them (:mod:`svdkit.analysis.metrics` lists them). Columns that bear WeightWatcher's
names carry WeightWatcher's meaning.

Conv2d kernels (out, in, kh, kw) are seen two ways (``conv2d=``): ``"matrix"``, the
``(out, in*kh*kw)`` reshape that compression factorizes; and ``"slices"``, WeightWatcher's
convention, which pools the eigenvalues of the ``kh*kw`` slices ``W[:, :, i, j]``, each scaled by
``sqrt(1/2)`` (its ``conv2d_norm``), so ``alpha`` and the norms can be checked against it. For the
slices view ``rank`` sums the slices' ranks and ``sigma_min`` is the smallest pooled value.

The compression verdict is svdkit's one rule (:func:`svdkit.linalg.compression_suitability`,
``table.meta["verdict_rule"]`` states it) applied to the plain spectrum; given calibration data it
is also applied to the input-whitened spectrum (``whitened_*`` columns,
:mod:`svdkit.analysis.whitened`), which is what activation-aware compression truncates.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, Iterable, Literal

import numpy as np
import torch
from torch import nn

from ..distributed import current_group
from ..linalg import DEFAULT_VERDICT_ERROR, verdict_rule
from ..progress import ProgressLike, track
from ..surgery import TargetSpec
from .esd import EigenRoute, eigenvalues, iter_eigenvalues, resolve_route, sigma_floor
from .metrics import WW_COLUMNS, spectrum_metrics
from .sources import WeightItem, collect_items
from .table import AnalysisTable

__all__ = ["SUMMARY_COLUMNS", "WW_COLUMNS", "WW_LIMITS", "analyze_weights", "ww_eligible"]

#: Columns averaged by :meth:`AnalysisTable.summary`: WeightWatcher's ``get_summary`` columns, then svdkit's two.
SUMMARY_COLUMNS = (
    "log_norm", "alpha", "alpha_weighted", "log_alpha_norm", "log_spectral_norm", "stable_rank", "mp_softrank",
    "effective_rank", "rank_90_fraction",
)
#: WeightWatcher's default layer limits: ``min_evals <= M * rf <= max_evals`` and ``N <= max_N``.
WW_LIMITS = {"min_evals": 8, "max_evals": 15000, "max_N": 50000}
_BATCH_BYTES = 1 << 28  # bytes of float64 stacked per GPU batch
Conv2dView = Literal["matrix", "slices", "both"]


def ww_eligible(kind: str, shape: tuple[int, ...]) -> bool:
    """Whether WeightWatcher's default ``analyze()`` analyses a weight of this kind and stored shape.

    A matrix has ``N = max``, ``M = min`` of its two sides and ``rf = 1``; a Conv2d kernel
    (out, in, kh, kw) has ``N, M`` from (out, in) and ``rf = kh * kw`` (pooled slices).
    """
    if kind == "conv2d":
        N, M, rf = max(shape[:2]), min(shape[:2]), shape[2] * shape[3]
    else:
        N, M, rf = max(shape), min(shape), 1
    return WW_LIMITS["min_evals"] <= M * rf <= WW_LIMITS["max_evals"] and N <= WW_LIMITS["max_N"]


def _rank_eps(dtype: torch.dtype) -> float:
    """Machine epsilon for the numerical-rank tolerance: the weight's own for float32/float64.

    16-bit and 8-bit floats use float32's: their own epsilon (``2**-8`` for bfloat16) times
    ``max(m, n)`` exceeds 1, which would call every such matrix rank 0.
    """
    return torch.finfo(dtype if dtype in (torch.float32, torch.float64) else torch.float32).eps


def _views(item: WeightItem, tensor: torch.Tensor, conv2d: str) -> list[tuple[str, torch.Tensor]]:
    if item.kind != "conv2d":
        return [("matrix", tensor)]
    out = []
    if conv2d in ("matrix", "both"):
        out.append(("matrix", tensor.reshape(tensor.shape[0], -1)))
    if conv2d in ("slices", "both"):
        # (kh*kw, out, in): WeightWatcher's slices W[:, :, i, j]; its sqrt(1/2) scaling (conv2d_norm)
        # is applied to the eigenvalues, exactly, in float64.
        out.append(("slices", tensor.permute(2, 3, 0, 1).reshape(-1, tensor.shape[0], tensor.shape[1])))
    return out


def _spectra(item: WeightItem, conv2d: str, eigen_route: str) -> list[tuple[str, tuple[int, int], np.ndarray, int | None, str]]:
    """Eigenvalues of each view of one weight: (view, shape, lam descending, pooled rank or None, route)."""
    tensor = item.load()
    eps = _rank_eps(item.dtype)
    results = []
    try:
        for view, W in _views(item, tensor, conv2d):
            route = resolve_route(eigen_route, W.dtype, tuple(W.shape))
            lam = eigenvalues(W, eigen_route).cpu().numpy()
            m, n = (int(d) for d in W.shape[-2:])
            if view == "slices":
                tol = max(max(m, n) * eps, sigma_floor(route))
                ranks = sum(int(np.count_nonzero(row > (tol**2) * row[0])) for row in lam)
                results.append((view, (m, n), np.sort(lam.ravel())[::-1] * 0.5, ranks, route))
            else:
                results.append((view, (m, n), lam, None, route))
    except ValueError as exc:
        raise ValueError(f"layer {item.name} ({item.kind}, shape {item.shape}): {exc}") from exc
    finally:
        del tensor
    return results


def analyze_weights(
    source: Any,
    *,
    target_modules: TargetSpec = None,
    exclude_modules: TargetSpec = (),
    kinds: Iterable[str] | None = None,
    conv2d: Conv2dView = "matrix",
    fit: bool = True,
    mp_fit: bool = False,
    error: float | None = DEFAULT_VERDICT_ERROR,
    eigen_route: EigenRoute = "auto",
    calibration: Any = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    verdict_method: str = "whiten",
    min_evals: int = 8,
    workers: int | None = None,
    stack: bool | None = None,
    keep_spectra: bool = True,
    progress: ProgressLike = False,
) -> AnalysisTable:
    """Analyse the spectra of a model's weight matrices.

    Parameters
    ----------
    source : nn.Module, LoadedModel, dict of str to Tensor, or str/PathLike
        A model; a state dict; or a ``.safetensors`` file or directory of shards (with its
        ``model.safetensors.index.json`` when there is one), read one tensor at a time (see
        :mod:`svdkit.analysis.sources`).
    target_modules, exclude_modules : str or list of str, optional
        PEFT-style selection by name (:func:`svdkit.surgery.matches_target`). Embeddings and the
        output head are included: analysis changes nothing.
    kinds : iterable of str, optional
        Keep only these kinds (``"linear"``, ``"conv1d"``, ``"conv2d"``, ``"embedding"``; ``"dense"``
        for 2-D tensors of a state dict or file).
    conv2d : {"matrix", "slices", "both"}
        How Conv2d kernels are seen (see the module docstring); ``"both"`` gives two rows.
    fit, mp_fit : bool
        Power-law fit (default on); WeightWatcher's Marchenko-Pastur fit (off; needs SciPy).
    error : float or None
        Relative error of the verdict rule (:func:`svdkit.linalg.compression_suitability`);
        None leaves the verdict columns out.
    eigen_route : {"auto", "gram", "svd"}
        How the eigenvalues are computed (:mod:`svdkit.analysis.esd`): ``"auto"`` is fastest,
        ``"gram"`` float64-exact, ``"svd"`` the reference.
    calibration : iterable of batches, optional
        Data that calibrates the input-whitened verdict of Linear, Conv1D and Conv2d layers
        (``whitened_*`` columns; module sources only): tensors, dicts of tensors, or strings with a
        :class:`~svdkit.models.LoadedModel`.
    forward : callable, optional
        ``forward(module, batch) -> output`` runs the model on one calibration batch.
    verdict_method : str
        The compression method whose transform the calibrated verdict judges
        (:data:`svdkit.compression.methods.METHODS`; one that needs only the layer inputs:
        ``"whiten"``, the default, or ``"asvd"``), with :class:`~svdkit.compression.CompressConfig`'s
        default options, so the verdict is what that method's compression would truncate.
    min_evals : int
        Layers with fewer eigenvalues get no power-law fit.
    workers : int, optional
        CPU worker threads; default torch's thread count, or 1 for files (one tensor in memory).
    stack : bool, optional
        Decompose same-shape matrices as one batch (up to 256 MiB of float64 each); default: when
        the weights are on a GPU, where batching pays. Never for files.
    keep_spectra : bool
        Keep each layer's eigenvalues in ``table.spectra`` (for figures).
    progress : bool or callable
        Progress over the matrices (:mod:`svdkit.progress`).

    Returns
    -------
    AnalysisTable
        One record per layer and view, in model order. A module tied to another's weight (an
        LM head tied to its embedding) has its own row, ``tied_to`` naming the original, computed
        once. ``table.skipped`` lists what was left out and why (1-D tensors, NaN weights,
        unreadable tensors); ``table.summary()`` averages :data:`SUMMARY_COLUMNS` over the rows
        with ``ww_eligible`` (the layer set of WeightWatcher's ``get_summary``).

    Raises
    ------
    ValueError
        If nothing could be analysed (the message lists the skips), or for bad arguments.
    FileNotFoundError, TypeError
        For a missing path or shard, or an unsupported source.

    Examples
    --------
    >>> table = analyze_weights(model)                       # doctest: +SKIP
    >>> table.summary()["alpha"], table["encoder.layer.0.attention.self.query"]["stable_rank"]  # doctest: +SKIP
    """
    if conv2d not in ("matrix", "slices", "both"):
        raise ValueError(f"conv2d must be 'matrix', 'slices' or 'both', got {conv2d!r}")
    if error is not None and not 0 <= error < 1:
        raise ValueError(f"error must be in [0, 1), got {error!r}")
    resolve_route(eigen_route, torch.float32)  # validates the name
    model = getattr(source, "module", None) if not hasattr(source, "named_modules") else source
    if calibration is not None:  # before any work
        if model is None:
            raise ValueError("calibration= needs a model (an nn.Module or LoadedModel), not a state dict or files")
        from .whitened import verdict_transform

        verdict_transform(verdict_method)  # an unknown method, or one that needs gradients, fails now
    start = time.perf_counter()
    with contextlib.ExitStack() as files:
        items, skipped, streamed = collect_items(
            model if model is not None else source, files, target_modules=target_modules, exclude_modules=exclude_modules, kinds=kinds,
        )
        originals = [i for i, item in enumerate(items) if item.tied_to is None]
        if not originals:
            detail = "; ".join(f"{n}: {r}" for n, r in skipped[:10]) or "the source holds no matrices"
            raise ValueError(f"no analysable layers in the {type(source).__name__} source ({detail})")
        on_cpu = all(items[i].device == "cpu" for i in originals)
        if workers is None:
            workers = 1 if streamed else torch.get_num_threads()
        options = {"fit": fit, "mp_fit": mp_fit, "error": error, "min_evals": min_evals, "conv2d": conv2d}
        batched = (not on_cpu) if stack is None else bool(stack)
        jobs = _jobs(items, originals, batched and not streamed, eigen_route, options)
        group = current_group()
        if group.active:  # under torchrun: each rank reads and analyses its share, costs balanced
            owners = group.owners([_job_cost(items, job) for job in jobs])
            jobs = [job for job, owner in zip(jobs, owners) if owner == group.rank]
        results: dict[int, Any] = {}
        for job, result in track(iter_eigenvalues(jobs, _run_job, workers=workers, on_cpu=on_cpu), progress,
                                 desc="weight spectra", total=len(jobs)):
            for index, outcome in zip(job[0], result if isinstance(result, list) else [result] * len(job[0])):
                results[index] = outcome
        if group.active:
            for part in group.gather_objects(results):
                results.update(part)
    records, spectra = _assemble(items, results, skipped, keep_spectra, conv2d)
    if not records:
        detail = "; ".join(f"{n}: {r}" for n, r in skipped[:10])
        raise ValueError(f"no analysable layers: every candidate was skipped ({detail})")
    meta = {"eigen_route": eigen_route, "workers": workers, "streamed": streamed, "conv2d": conv2d,
            "stacked": batched and not streamed, "error": error,
            "verdict_rule": verdict_rule(error) + " (plain spectrum)" if error is not None else None}
    if calibration is not None:
        from .whitened import add_whitened_verdicts

        meta["whitened"] = add_whitened_verdicts(source, records, calibration, forward, error, method=verdict_method, progress=progress)
    meta["seconds"] = time.perf_counter() - start
    return AnalysisTable(records, skipped, spectra, SUMMARY_COLUMNS, meta, summary_where="ww_eligible")


def _job_cost(items, job) -> int:
    """The eigensolve cost of a job's matrices, ``m * n * min(m, n)`` each (the rank's share of work)."""
    total = 0
    for index in job[0]:
        shape = items[index].shape
        rows, cols = shape[0], max(1, math.prod(shape) // max(shape[0], 1))
        total += rows * cols * min(rows, cols)
    return total


def _assemble(items, results, skipped, keep_spectra, conv2d) -> tuple[list[dict], list]:
    """Records in model order; a tied copy repeats its original's rows under its own name."""
    by_name: dict[str, list[tuple[dict, np.ndarray]]] = {}
    records, spectra = [], []
    for index, item in enumerate(items):
        if item.tied_to is not None:
            rows = by_name.get(item.tied_to)
            if rows is None:
                skipped.append((item.name, f"tied to {item.tied_to}, which was skipped"))
                continue
            rows = [({**record, "name": item.name, "kind": item.kind, "tied_to": item.tied_to}, lam) for record, lam in rows]
        else:
            outcome = results[index]
            if isinstance(outcome, Exception):
                skipped.append((item.name, str(outcome)))
                continue
            rows = outcome
            by_name[item.name] = rows
        for record, lam in rows:
            eligible = ww_eligible(item.kind, item.shape) and not (conv2d == "both" and record["view"] == "matrix" and item.kind == "conv2d")
            records.append({**record, "ww_eligible": eligible})
            spectra.append(lam if keep_spectra else None)
    return records, spectra


def _jobs(items: list[WeightItem], originals: list[int], batched: bool, eigen_route: str, options: dict) -> list[tuple]:
    """Work units: one item each, or same-shape 2-D weights stacked into batches."""
    if not batched:
        return [([i], [items[i]], eigen_route, options) for i in originals]
    jobs = [([i], [items[i]], eigen_route, options) for i in originals if items[i].kind == "conv2d"]
    groups: dict[tuple, list[int]] = {}
    for i in originals:
        if items[i].kind != "conv2d":
            groups.setdefault((items[i].shape, items[i].dtype, items[i].device), []).append(i)
    for (shape, _, _), idx in groups.items():
        per = max(1, _BATCH_BYTES // (math.prod(shape) * 8))
        for k in range(0, len(idx), per):
            chunk = idx[k:k + per]
            jobs.append((chunk, [items[i] for i in chunk], eigen_route, options))
    return jobs


def _records(item: WeightItem, views: list, options: dict) -> list[tuple[dict, np.ndarray]]:
    eps = _rank_eps(item.dtype)
    out = []
    for view, shape, lam, pooled_rank, route in views:
        floor = sigma_floor(route)
        if route == "gram32":
            lam = np.where(lam > (floor**2) * lam[0], lam, 0.0)  # below the route's resolution: zero
        record = {"name": item.name, "kind": item.kind, "view": view, "shape": list(item.shape),
                  "rows": shape[0], "cols": shape[1], "dtype": str(item.dtype).replace("torch.", ""), "route": route}
        record.update(spectrum_metrics(
            lam, shape, eps=eps, sigma_floor=floor, exact=route != "gram32", fit=options["fit"],
            mp_fit=options["mp_fit"], error=options["error"] if view == "matrix" else None,
            min_evals=options["min_evals"], rank=pooled_rank,
        ))
        out.append((record, lam))
    return out


def _run_job(job: tuple) -> list:
    """Records for one job: a list with one outcome (list of (record, lam), or Exception) per item."""
    indices, items, eigen_route, options = job
    if len(items) > 1:
        tensors = [it.load() for it in items]
        try:
            lam = eigenvalues(torch.stack(tensors), eigen_route).cpu().numpy()
        except ValueError:
            lam = None  # one of them is bad: go one by one to find it
        if lam is not None:
            shape = tuple(int(d) for d in tensors[0].shape)
            route = resolve_route(eigen_route, tensors[0].dtype, shape)
            return [_guard(item, lambda it=item, row=row: _records(it, [("matrix", shape, row, None, route)], options))
                    for item, row in zip(items, lam)]
    return [_guard(item, lambda it=item: _records(it, _spectra(it, options["conv2d"], eigen_route), options)) for item in items]


def _guard(item: WeightItem, fn):
    try:
        return fn()
    except Exception as exc:
        message = str(exc)
        return exc if message.startswith(f"layer {item.name}") else ValueError(f"layer {item.name}: {message}")

