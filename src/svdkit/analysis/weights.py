"""Spectral diagnostics of weight matrices: one table row per layer, WeightWatcher-grade, fast.

Each layer's matrix ``W`` (:mod:`svdkit.views`) gives its eigenvalues ``lambda_i = s_i**2``
(:mod:`svdkit.analysis.esd`), and every metric is read from them:

==========================  =====================================================================
column                      meaning
==========================  =====================================================================
rank                        numerical rank, tolerance ``max(m, n) * eps * s_max``, ``eps`` of the
                            weight's dtype (float32's for 16-bit weights)
sigma_max, sigma_min        largest / smallest singular value; condition_number their ratio
frobenius_norm ...          ``||W||_F``, ``||W||_2``, ``||W||_*`` and their ``log10_*``
stable_rank                 ``sum(lambda) / lambda_max``
effective_rank              ``exp(H(s / sum(s)))`` (Roy & Vetterli)
top10_energy                share of ``sum(lambda)`` in the top 10 values
rank_90, rank_99            smallest rank keeping 90 / 99 % of the energy; ``*_fraction`` over M
alpha, xmin, ks_distance    power-law fit of the ESD (:func:`~svdkit.analysis.powerlaw.fit_power_law`)
log_norm, log_spectral_norm WeightWatcher's: ``log10(sum lambda)``, ``log10(lambda_max)`` (squared norms)
alpha_weighted              ``alpha * log10(lambda_max)``; log_alpha_norm ``log10(sum lambda**alpha)``
sigma_mp ... mp_softrank    Marchenko-Pastur bulk (``mp_fit=True``)
tol_rank, tol_param_saving  rank for a relative Frobenius error <= ``error_tol``, parameters saved
verdict                     "compress" (saves >= half), "marginal" (saves some), "keep_dense"
==========================  =====================================================================

Conv2d kernels (out, in, kh, kw) are seen two ways (``conv2d=``): ``"matrix"``, the
``(out, in*kh*kw)`` reshape that compression factorizes; and ``"slices"``, WeightWatcher's
convention, which pools the eigenvalues of the ``kh*kw`` slices ``W[:, :, i, j]``, each scaled by
``sqrt(1/2)`` (its ``conv2d_norm``), so ``alpha`` and the norms can be checked against it. For the
slices view ``rank`` sums the slices' ranks and ``sigma_min`` is the smallest pooled value.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Iterable, Literal

import numpy as np
import torch

from ..linalg import ErrorTol, condition_number, effective_rank, energy_rank, numerical_rank, resolve_rank, stable_rank
from ..surgery import TargetSpec
from .esd import eigenvalues, iter_eigenvalues, resolve_method
from .powerlaw import EVALS_THRESH, fit_marchenko_pastur, fit_power_law
from .sources import WeightItem, collect_items
from .table import AnalysisTable

__all__ = ["SUMMARY_COLUMNS", "analyze_weights", "spectrum_metrics"]

#: Columns averaged by :meth:`AnalysisTable.summary`, as in WeightWatcher's ``get_summary``.
SUMMARY_COLUMNS = (
    "log_norm", "alpha", "alpha_weighted", "log_alpha_norm", "log_spectral_norm", "stable_rank", "mp_softrank",
    "effective_rank", "rank_90_fraction",
)
_OVER_TRAINED, _UNDER_TRAINED = 2.0, 6.0
_BATCH_BYTES = 1 << 28  # float64 bytes stacked per GPU batch
Conv2dView = Literal["matrix", "slices", "both"]


def _log10(x: float) -> float:
    return math.log10(x) if x > 0 else float("-inf")


def spectrum_metrics(
    lam: np.ndarray,
    shape: tuple[int, int],
    *,
    eps: float,
    fit: bool = True,
    mp_fit: bool = False,
    error_tol: float | None = 0.05,
    min_evals: int = 8,
    rank: int | None = None,
) -> dict[str, Any]:
    """Every metric of one ESD.

    Parameters
    ----------
    lam : ndarray of shape (M,)
        Eigenvalues ``s**2``, descending, float64.
    shape : (N, M)
        The matrix (or slice) shape; ``Q = max/min`` for the MP fit, ``(m, n)`` for ranks.
    eps : float
        Machine epsilon of the weight's dtype (numerical-rank tolerance).
    fit, mp_fit : bool
        Run the power-law / Marchenko-Pastur fits.
    error_tol : float or None
        Relative Frobenius error for the compression columns; None leaves them out.
    min_evals : int
        Fewer eigenvalues than this skip the power-law fit (WeightWatcher's ``min_evals``).
    rank : int, optional
        Numerical rank computed elsewhere (pooled Conv2d slices).

    Returns
    -------
    dict
    """
    S = np.sqrt(lam)
    m, n = int(shape[0]), int(shape[1])
    total = float(lam.sum())
    lam_max = float(lam[0])
    M = lam.size
    out: dict[str, Any] = {"num_evals": M}
    out["rank"] = int(numerical_rank(S, (m, n), eps=eps)) if rank is None else int(rank)
    out["sigma_max"] = float(S[0])
    out["sigma_min"] = float(S[-1])
    out["condition_number"] = float(condition_number(S))
    fro, nuc = math.sqrt(total), float(S.sum())
    out.update(
        frobenius_norm=fro, log10_frobenius_norm=_log10(fro),
        spectral_norm=float(S[0]), log10_spectral_norm=_log10(float(S[0])),
        nuclear_norm=nuc, log10_nuclear_norm=_log10(nuc),
        stable_rank=float(stable_rank(S)),
        effective_rank=float(effective_rank(S, "sigma")),
        top10_energy=float(lam[:10].sum() / total) if total > 0 else float("nan"),
    )
    for pct, frac in ((90, 0.9), (99, 0.99)):
        k = int(energy_rank(S, frac))
        out[f"rank_{pct}"] = k
        out[f"rank_{pct}_fraction"] = k / M
    out["log_norm"] = _log10(total)
    out["log_spectral_norm"] = _log10(lam_max)
    if fit and M >= min_evals:
        pl = fit_power_law(lam, thresh=EVALS_THRESH)
        alpha = pl.alpha
        out.update(alpha=alpha, xmin=pl.xmin, xmax=pl.xmax, ks_distance=pl.D, alpha_sigma=pl.sigma,
                   num_pl_spikes=pl.num_pl_spikes, fit_status=pl.status if pl.ok else f"failed: {pl.reason}")
    elif fit:
        alpha = float("nan")
        out.update(alpha=alpha, xmin=float("nan"), xmax=lam_max, ks_distance=float("nan"), alpha_sigma=float("nan"),
                   num_pl_spikes=-1, fit_status=f"skipped: {M} eigenvalues < min_evals={min_evals}")
    if fit:
        ok = math.isfinite(alpha)
        out["alpha_weighted"] = alpha * out["log_spectral_norm"] if ok else float("nan")
        with np.errstate(over="ignore", divide="ignore"):
            out["log_alpha_norm"] = _log10(float(np.sum(lam ** alpha))) if ok else float("nan")
        out["warning"] = "over-trained" if ok and alpha < _OVER_TRAINED else "under-trained" if ok and alpha > _UNDER_TRAINED else ""
    if mp_fit:
        if total > 0:
            mp = fit_marchenko_pastur(lam, max(m, n) / min(m, n))
            out.update(sigma_mp=mp.sigma_mp, bulk_min=mp.bulk_min, bulk_max=mp.bulk_max,
                       num_spikes=mp.num_spikes, mp_softrank=mp.mp_softrank)
        else:
            out.update(sigma_mp=float("nan"), bulk_min=float("nan"), bulk_max=float("nan"), num_spikes=0, mp_softrank=float("nan"))
    if error_tol is not None:
        k = resolve_rank(S, ErrorTol(error_tol), (m, n)) if total > 0 else 1
        saving = 1.0 - k * (m + n) / (m * n)
        out["tol_rank"] = k
        out["tol_param_saving"] = saving
        out["verdict"] = "compress" if saving >= 0.5 else "marginal" if saving > 0 else "keep_dense"
    return out


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


def _compute(item: WeightItem, conv2d: str, method: str) -> list[tuple[str, tuple[int, int], np.ndarray, int | None]]:
    """Eigenvalues of each view of one weight: (view, shape, lam descending, pooled rank or None)."""
    tensor = item.load()
    eps = _rank_eps(item.dtype)
    results = []
    try:
        for view, W in _views(item, tensor, conv2d):
            lam = eigenvalues(W, method).cpu().numpy()
            if view == "slices":
                m, n = W.shape[-2:]
                ranks = sum(int(numerical_rank(np.sqrt(row), (m, n), eps=eps)) for row in lam)
                results.append((view, (int(m), int(n)), np.sort(lam.ravel())[::-1] * 0.5, ranks))
            else:
                results.append((view, tuple(int(d) for d in W.shape), lam, None))
    except ValueError as exc:
        raise ValueError(f"layer {item.name} ({item.kind}, shape {item.shape}): {exc}") from exc
    finally:
        del tensor
    return results


def _progress(iterable, total: int, progress: bool, what: str):
    if not progress:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - depends on the environment
        return iterable
    return tqdm(iterable, total=total, desc=what, unit="layer", leave=False)


def analyze_weights(
    source: Any,
    *,
    targets: TargetSpec = None,
    exclude: TargetSpec = (),
    kinds: Iterable[str] | None = None,
    conv2d: Conv2dView = "matrix",
    fit: bool = True,
    mp_fit: bool = False,
    error_tol: float | None = 0.05,
    method: str = "auto",
    min_evals: int = 8,
    workers: int | None = None,
    stack: bool | None = None,
    keep_spectra: bool = True,
    progress: bool = False,
) -> AnalysisTable:
    """Analyse the spectra of a model's weight matrices.

    Parameters
    ----------
    source : nn.Module, dict of str to Tensor, or str/PathLike
        A model; a state dict; or a ``.safetensors`` file or directory of them, read one tensor at
        a time (see :mod:`svdkit.analysis.sources`).
    targets, exclude : str or list of str, optional
        PEFT-style selection by name (:func:`svdkit.surgery.find_targets`). Embeddings and the
        output head are included: analysis changes nothing.
    kinds : iterable of str, optional
        Keep only these kinds (``"linear"``, ``"conv1d"``, ``"conv2d"``, ``"embedding"``; ``"dense"``
        for 2-D tensors of a state dict or file).
    conv2d : {"matrix", "slices", "both"}
        How Conv2d kernels are seen (see the module docstring); ``"both"`` gives two rows.
    fit, mp_fit : bool
        Power-law fit (default on); Marchenko-Pastur bulk (off).
    error_tol : float or None
        Relative Frobenius error for the compression verdict; None leaves those columns out.
    method : {"auto", "gram", "svd"}
        Eigenvalue route (:mod:`svdkit.analysis.esd`).
    min_evals : int
        Layers with fewer eigenvalues get no power-law fit.
    workers : int, optional
        CPU worker threads; default torch's thread count, or 1 for files (one tensor in memory).
    stack : bool, optional
        Decompose same-shape matrices as one batch (up to 256 MiB of float64 each); default: when
        the weights are on a GPU, where batching pays. Never for files.
    keep_spectra : bool
        Keep each layer's eigenvalues in ``table.spectra`` (for figures).
    progress : bool
        Show a progress bar (needs tqdm).

    Returns
    -------
    AnalysisTable
        One record per layer and view, in model order; ``table.skipped`` lists what was left out
        and why (1-D tensors, NaN weights, tied copies, unreadable tensors); ``table.summary()``
        averages :data:`SUMMARY_COLUMNS`.

    Raises
    ------
    ValueError
        If nothing could be analysed (the message lists the skips), or for bad arguments.
    FileNotFoundError, TypeError
        For a missing path or an unsupported source.

    Examples
    --------
    >>> table = analyze_weights(model)                       # doctest: +SKIP
    >>> table.summary()["alpha"], table["encoder.layer.0.attention.self.query"]["stable_rank"]  # doctest: +SKIP
    """
    if conv2d not in ("matrix", "slices", "both"):
        raise ValueError(f"conv2d must be 'matrix', 'slices' or 'both', got {conv2d!r}")
    if error_tol is not None and not 0 <= error_tol < 1:
        raise ValueError(f"error_tol must be in [0, 1), got {error_tol}")
    resolve_method(method, torch.float32)  # validates the name
    start = time.perf_counter()
    with contextlib.ExitStack() as files:
        items, skipped, streamed = collect_items(source, files, targets=targets, exclude=exclude, kinds=kinds)
        if not items:
            detail = "; ".join(f"{n}: {r}" for n, r in skipped[:10]) or "the source holds no matrices"
            raise ValueError(f"no analysable layers in the {type(source).__name__} source ({detail})")
        on_cpu = all(item.device == "cpu" for item in items)
        if workers is None:
            workers = 1 if streamed else torch.get_num_threads()
        options = {"fit": fit, "mp_fit": mp_fit, "error_tol": error_tol, "min_evals": min_evals}
        batched = (not on_cpu) if stack is None else bool(stack)
        jobs = _jobs(items, batched and not streamed, conv2d, method, options)
        results: dict[int, Any] = {}
        for job, result in _progress(iter_eigenvalues(jobs, _run_job, workers=workers, on_cpu=on_cpu), len(jobs), progress, "spectra"):
            for index, outcome in zip(job[0], result if isinstance(result, list) else [result] * len(job[0])):
                results[index] = outcome
    records, spectra = [], []
    for index, item in enumerate(items):
        outcome = results[index]
        if isinstance(outcome, Exception):
            skipped.append((item.name, str(outcome)))
            continue
        for record, lam in outcome:
            records.append(record)
            spectra.append(lam if keep_spectra else None)
    if not records:
        detail = "; ".join(f"{n}: {r}" for n, r in skipped[:10])
        raise ValueError(f"no analysable layers: every candidate was skipped ({detail})")
    meta = {"method": method, "workers": workers, "streamed": streamed, "conv2d": conv2d, "stacked": batched and not streamed,
            "seconds": time.perf_counter() - start, "error_tol": error_tol}
    return AnalysisTable(records, skipped, spectra, SUMMARY_COLUMNS, meta)


def _jobs(items: list[WeightItem], batched: bool, conv2d: str, method: str, options: dict) -> list[tuple]:
    """Work units: one item each, or same-shape 2-D weights stacked into batches."""
    if not batched:
        return [([i], [item], conv2d, method, options) for i, item in enumerate(items)]
    single = [i for i, it in enumerate(items) if it.kind == "conv2d"]
    dense = [i for i, it in enumerate(items) if it.kind != "conv2d"]
    jobs = [([i], [items[i]], conv2d, method, options) for i in single]
    groups: dict[tuple, list[int]] = {}
    for i in dense:
        groups.setdefault((items[i].shape, items[i].dtype, items[i].device), []).append(i)
    for (shape, _, _), idx in groups.items():
        per = max(1, _BATCH_BYTES // (math.prod(shape) * 8))
        for k in range(0, len(idx), per):
            chunk = idx[k:k + per]
            jobs.append((chunk, [items[i] for i in chunk], conv2d, method, options))
    return jobs


def _records(item: WeightItem, views: list, options: dict) -> list[tuple[dict, np.ndarray]]:
    eps = _rank_eps(item.dtype)
    out = []
    for view, shape, lam, pooled_rank in views:
        record = {"name": item.name, "kind": item.kind, "view": view, "shape": list(item.shape),
                  "rows": shape[0], "cols": shape[1], "dtype": str(item.dtype).replace("torch.", "")}
        record.update(spectrum_metrics(
            lam, shape, eps=eps, fit=options["fit"], mp_fit=options["mp_fit"],
            error_tol=options["error_tol"] if view == "matrix" else None,
            min_evals=options["min_evals"], rank=pooled_rank,
        ))
        out.append((record, lam))
    return out


def _run_job(job: tuple) -> list:
    """Records for one job: a list with one outcome (list of (record, lam), or Exception) per item."""
    indices, items, conv2d, method, options = job
    if len(items) > 1:
        tensors = [it.load() for it in items]
        try:
            lam = eigenvalues(torch.stack(tensors), method).cpu().numpy()
        except ValueError:
            lam = None  # one of them is bad: go one by one to find it
        if lam is not None:
            shape = tuple(int(d) for d in tensors[0].shape)
            return [_guard(item, lambda it=item, row=row: _records(it, [("matrix", shape, row, None)], options)) for item, row in zip(items, lam)]
    return [_guard(item, lambda it=item: _records(it, _compute(it, conv2d, method), options)) for item in items]


def _guard(item: WeightItem, fn):
    try:
        return fn()
    except Exception as exc:
        message = str(exc)
        return exc if message.startswith(f"layer {item.name}") else ValueError(f"layer {item.name}: {message}")
