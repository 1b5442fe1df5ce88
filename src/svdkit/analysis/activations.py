"""Spectral diagnostics of representations: streamed per-layer covariance, rank metrics and CKA.

Forward hooks on the chosen modules turn each output into samples, which a float64
:class:`~svdkit.analysis.covariance.CovarianceAccumulator` per layer absorbs batch by batch; no
activation outlives its batch. Hooks are removed in ``finally``.

What a sample is (``samples=``):

========================  ==========================  ====================================
output shape              ``"tokens"`` (default)      ``"pooled"``
========================  ==========================  ====================================
(B, d)                    each row                    each row
(B, T, d) sequences       each non-padding token      the mean of each sequence's tokens
(B, C, H, W) feature map  each position (C values)    the spatial mean of each map
========================  ==========================  ====================================

Padding tokens are left out when the batch carries an ``attention_mask`` (dict batches, or
strings tokenized through a :class:`~svdkit.models.LoadedModel`). A module returning a tuple,
list, dict or ``ModelOutput`` contributes the tensor :func:`svdkit.batches.output_tensor` finds
in it (svdkit's one rule: a sentence embedding, logits or last hidden state by name, else the
first floating-point tensor).

Per layer, from the covariance eigenvalues ``lambda_1 >= ... >= lambda_d``:
``effective_rank`` (``exp`` of the entropy of the explained-variance ratios, svdkit's
``effective_rank(kind="variance")``), ``rankme`` (RankMe, Garrido et al. 2023: the entropy rank of
the singular values of the uncentred sample matrix, ``p = s / sum(s) + 1e-7``), the explained
variance ratios, the cumulative share at 10/50/100 dimensions, the dimensions for 90/99 %, and the
top singular values of the centred samples scaled to standard deviations (``sqrt(lambda)``).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..batches import BatchRunner, NonFiniteData, output_tensor, run_batch
from ..linalg import effective_rank, energy_rank, gram_eigenvalues
from ..progress import ProgressLike, track
from ..surgery import matches_target
from .covariance import CovarianceAccumulator, cka_from_scatter
from .table import AnalysisTable

__all__ = [
    "ACTIVATION_SUMMARY",
    "NonFiniteData",
    "activation_metrics",
    "analyze_activations",
    "compare_activations",
    "select_modules",
    "to_samples",
]

ACTIVATION_SUMMARY = ("effective_rank", "rankme", "dims_90", "dims_99", "cum_var_10")
_RANKME_EPS = 1e-7


def _module_of(model: Any) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module) else model


def select_modules(
    model: nn.Module,
    target_modules: str | Sequence[str] | None = None,
    types: Sequence[type | str] | None = None,
) -> list[tuple[str, nn.Module]]:
    """Modules to hook, in model order.

    Parameters
    ----------
    model : nn.Module
    target_modules : str, list of str, or None
        PEFT-style names: a string is a regular expression matched against the full name; a list
        matches names exactly or as dotted suffixes.
    types : sequence of type or str, optional
        Module classes (or class names) to keep.

    Returns
    -------
    list of (name, module)
        With neither ``target_modules`` nor ``types``: the blocks of the model's longest ``nn.ModuleList``
        (a transformer's layers, a ResNet stage's blocks), or, without one, the top-level children.

    Raises
    ------
    ValueError
        If nothing matches (the message suggests names).
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    if target_modules is None and types is None:
        lists = [(n, m) for n, m in named if isinstance(m, nn.ModuleList) and len(m) > 0]
        if lists:
            name, longest = max(lists, key=lambda nm: len(nm[1]))
            return [(f"{name}.{i}", block) for i, block in enumerate(longest)]
        return list(model.named_children())
    chosen = []
    for name, module in named:
        if target_modules is not None and not matches_target(name, target_modules):
            continue
        if types is not None and not any(
            (isinstance(t, str) and type(module).__name__ == t) or (isinstance(t, type) and isinstance(module, t)) for t in types
        ):
            continue
        chosen.append((name, module))
    if not chosen:
        sample = ", ".join(n for n, _ in named[:6])
        raise ValueError(f"no module matches target_modules={target_modules!r} types={types!r}; module names look like: {sample} ...")
    return chosen


def to_samples(name: str, out: torch.Tensor, mask: torch.Tensor | None, samples: str) -> torch.Tensor:
    """An output as (N, d) samples (see the module docstring)."""
    if out.ndim == 2:
        return out
    if out.ndim == 3:
        B, T, d = out.shape
        use_mask = mask is not None and tuple(mask.shape) == (B, T)
        if samples == "tokens":
            return out[mask.to(out.device).bool()] if use_mask else out.reshape(-1, d)
        if use_mask:
            w = mask.to(out.device, out.dtype).unsqueeze(-1)
            return (out * w).sum(dim=1) / w.sum(dim=1).clamp_min(1)
        return out.mean(dim=1)
    if out.ndim == 4:
        if samples == "tokens":
            return out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])
        return out.mean(dim=(2, 3))
    raise ValueError(f"layer {name}: cannot turn an output of shape {tuple(out.shape)} into samples (2-D, 3-D or 4-D only)")


class _Batches:
    """Feeds data to a model and knows the current batch's attention mask."""

    def __init__(self, model: Any, data: Any, forward: Callable | None, batch_size: int) -> None:
        if data is None:
            raise ValueError("data is None: pass a list of strings (with a model from svdkit.models.load_model), "
                             "or an iterable of batches (tensors, dicts of tensors, (inputs, labels) pairs)")
        if isinstance(data, (str, bytes)):
            raise TypeError(f"data must be a list of strings or an iterable of batches, not a single {type(data).__name__}")
        if not hasattr(data, "__iter__"):
            raise TypeError(f"data must be a list of strings or an iterable of batches, got {type(data).__name__}")
        self.model, self.forward, self.batch_size = model, forward, batch_size
        self.data = data
        self.mask: torch.Tensor | None = None

    def __iter__(self):
        data = self.data
        if isinstance(data, (list, tuple)) and data and isinstance(data[0], str):
            if not hasattr(self.model, "tokenize"):
                raise TypeError("lists of strings need a model loaded with svdkit.models.load_model (it tokenizes them)")
            texts = sorted(data, key=len)  # similar lengths waste little on padding; order does not matter
            for start in range(0, len(texts), self.batch_size):
                yield self.model.tokenize(texts[start:start + self.batch_size])
            return
        yield from data

    def run(self, module: nn.Module, batch: Any) -> Any:
        """Run ``module`` (the model, or a second one of the same architecture) on one batch."""
        self.mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        if self.forward is not None:
            return self.forward(module, batch)
        if not isinstance(self.model, nn.Module) and hasattr(self.model, "module"):
            return self.model.forward(module, batch)  # a LoadedModel: it knows the input format
        return run_batch(module, batch)


def _hook_outputs(hooked, batches: _Batches, samples: str, sink: dict[str, torch.Tensor], runner: BatchRunner):
    def make(name: str):
        def hook(module, inputs, output):
            try:
                out = output_tensor(output)
            except TypeError:
                raise ValueError(f"layer {name} ({type(module).__name__}) returned no tensor") from None
            X = to_samples(name, out.detach(), batches.mask, samples)
            if not bool(torch.isfinite(X).all()):
                bad = int((~torch.isfinite(X)).sum())
                raise NonFiniteData(f"batch {runner.index}: the output of layer {name} ({type(module).__name__}) holds {bad} NaN or "
                                 f"infinite values of {X.numel()} (the first hooked layer they reach); check that batch's data")
            sink[name] = X
        return hook

    return [module.register_forward_hook(make(name)) for name, module in hooked]


def activation_metrics(acc: CovarianceAccumulator, top_k: int = 10) -> tuple[dict[str, Any], np.ndarray]:
    """Metrics of one layer's accumulated covariance, and its eigenvalues (descending).

    Returns
    -------
    record : dict
    lam : ndarray of shape (d,)
        Covariance eigenvalues, descending.
    """
    lam = gram_eigenvalues(acc.covariance()).cpu().numpy()
    raw = gram_eigenvalues(acc.second_moment()).sqrt().cpu().numpy()
    total = float(lam.sum())
    ratio = lam / total if total > 0 else np.zeros_like(lam)
    cum = np.cumsum(ratio)
    S = np.sqrt(lam)
    p = raw / raw.sum() + _RANKME_EPS if raw.sum() > 0 else np.full_like(raw, _RANKME_EPS)
    d = lam.size
    record = {
        "samples": acc.n,
        "dim": d,
        "total_variance": total,
        "effective_rank": float(effective_rank(S, "variance")) if total > 0 else 0.0,
        "rankme": float(math.exp(-np.sum(p * np.log(p)))),
        "explained_variance_ratio": ratio[:top_k].tolist(),
        "cum_var_10": float(cum[min(10, d) - 1]),
        "cum_var_50": float(cum[min(50, d) - 1]),
        "cum_var_100": float(cum[min(100, d) - 1]),
        "dims_90": int(energy_rank(S, 0.9)) if total > 0 else 0,
        "dims_99": int(energy_rank(S, 0.99)) if total > 0 else 0,
        "top_singular_values": S[:top_k].tolist(),
    }
    return record, lam


def analyze_activations(
    model: Any,
    data: Any,
    target_modules: str | Sequence[str] | None = None,
    *,
    types: Sequence[type | str] | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    samples: str = "tokens",
    batch_size: int = 64,
    cka: bool = False,
    top_k: int = 10,
    device: str | torch.device | None = None,
    progress: ProgressLike = False,
) -> AnalysisTable:
    """Stream a model's representations at chosen layers and measure their spectra.

    Parameters
    ----------
    model : nn.Module or LoadedModel
    data : list of str, or iterable of batches
        The data whose representations are analysed. Strings need a
        :class:`~svdkit.models.LoadedModel`; batches are tensors, dicts of tensors
        (``attention_mask`` masks padding) or (inputs, labels) pairs.
    target_modules : str or list of str, optional
        Names of the modules to hook (PEFT-style; see :func:`select_modules`).
    types : sequence of type or str, optional
        Module classes to hook.
    forward : callable, optional
        ``forward(module, batch) -> output`` runs the model on one batch (svdkit's one forward
        contract; its mask is read from dict batches).
    samples : {"tokens", "pooled"}
        What a sample is for 3-D/4-D outputs (module docstring).
    batch_size : int
        Strings per batch.
    cka : bool
        Also the linear CKA between every pair of hooked layers, in ``table.meta["cka"]``
        (``{"layers": [...], "matrix": [[...]]}``); layers must yield the same samples.
    top_k : int
        Explained-variance ratios and singular values kept per layer.
    device : optional
        Where accumulators live (default: each output's device).
    progress : bool or callable
        Progress over the batches (:mod:`svdkit.progress`).

    Returns
    -------
    AnalysisTable
        One record per hooked layer; ``table.spectra`` holds the covariance eigenvalues.

    Raises
    ------
    ValueError
        For no data (``None`` or no batches), a batch the model cannot run (naming the batch
        and the layer where it failed), a batch that makes a hooked layer's output NaN or
        infinite (naming both), a layer that saw no samples, CKA over layers with different
        sample counts, or a bad option.
    TypeError
        For data that is not an iterable of batches, or strings without a tokenizing model.
    """
    if samples not in ("tokens", "pooled"):
        raise ValueError(f"samples must be 'tokens' or 'pooled', got {samples!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    start = time.perf_counter()
    module = _module_of(model)
    chosen = select_modules(module, target_modules, types)
    names = [n for n, _ in chosen]
    batches = _Batches(model, data, forward, batch_size)
    sink: dict[str, torch.Tensor] = {}
    accs: dict[str, CovarianceAccumulator] = {}
    joint: CovarianceAccumulator | None = None
    dims: dict[str, int] = {}
    n_batches = 0
    runner = BatchRunner(module, batches.run)
    handles = _hook_outputs(chosen, batches, samples, sink, runner)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), runner:
            for batch in track(batches, progress, desc="batches"):
                sink.clear()
                runner(batch)
                n_batches += 1
                if cka:
                    joint = _update_joint(joint, names, sink, dims, device)
                else:
                    for name, X in sink.items():
                        if name not in accs:
                            accs[name] = CovarianceAccumulator(X.shape[1], device or X.device)
                        accs[name].update(X)
    finally:
        for handle in handles:
            handle.remove()
        module.train(was_training)
        sink.clear()
    if n_batches == 0:
        raise ValueError("the data held no batches")
    meta: dict[str, Any] = {"samples": samples, "batches": n_batches}
    if cka:
        accs, meta["cka"] = _split_joint(joint, names, dims)
    missing = [n for n in names if n not in accs or accs[n].n < 2]
    if missing:
        raise ValueError(f"{len(missing)} hooked layer(s) saw fewer than 2 samples: {', '.join(missing)}")
    records, spectra = [], []
    for name, mod in chosen:
        record, lam = activation_metrics(accs[name], top_k)
        records.append({"name": name, "type": type(mod).__name__, **record})
        spectra.append(lam)
    meta["seconds"] = time.perf_counter() - start
    return AnalysisTable(records, [], spectra, ACTIVATION_SUMMARY, meta)


def _update_joint(joint, names, sink, dims, device):
    """One accumulator over the concatenated samples of every layer: its blocks give the CKAs."""
    missing = [n for n in names if n not in sink]
    if missing:
        raise ValueError(f"CKA needs every hooked layer in every batch; {', '.join(missing)} produced nothing")
    counts = {n: sink[n].shape[0] for n in names}
    if len(set(counts.values())) > 1:
        raise ValueError(f"CKA needs the same samples at every layer; this batch gave {counts} (try samples='pooled')")
    X = torch.cat([sink[n].to(torch.float64) for n in names], dim=1)
    if joint is None:
        dims.update({n: sink[n].shape[1] for n in names})
        joint = CovarianceAccumulator(X.shape[1], device or X.device)
    return joint.update(X)


def _split_joint(joint, names, dims):
    offsets, pos = {}, 0
    for n in names:
        offsets[n] = slice(pos, pos + dims[n])
        pos += dims[n]
    accs = {}
    for n in names:
        acc = CovarianceAccumulator(dims[n], joint.M2.device)
        acc.n, acc.mean, acc.M2 = joint.n, joint.mean[offsets[n]].clone(), joint.M2[offsets[n], offsets[n]].clone()
        accs[n] = acc
    matrix = [[cka_from_scatter(joint.block(offsets[a], offsets[b]), joint.block(offsets[a], offsets[a]), joint.block(offsets[b], offsets[b]))
               for b in names] for a in names]
    return accs, {"layers": list(names), "matrix": matrix}


def compare_activations(
    model_a: Any,
    model_b: nn.Module | Any,
    data: Any,
    target_modules: str | Sequence[str] | None = None,
    *,
    types: Sequence[type | str] | None = None,
    samples: str = "tokens",
    batch_size: int = 64,
    progress: ProgressLike = False,
) -> AnalysisTable:
    """Linear CKA between the same layers of two models of one architecture, on the same inputs.

    Parameters
    ----------
    model_a : nn.Module or LoadedModel
        The reference (for strings, its tokenizer feeds both models).
    model_b : nn.Module or LoadedModel
        E.g. a compressed copy; it must have modules of the same names.
    data, target_modules, types, samples, batch_size, progress
        As for :func:`analyze_activations`.

    Returns
    -------
    AnalysisTable
        One record per layer: ``name``, ``cka`` (1 = same representation up to rotation and
        scale), ``samples``.
    """
    if samples not in ("tokens", "pooled"):
        raise ValueError(f"samples must be 'tokens' or 'pooled', got {samples!r}")
    start = time.perf_counter()
    mod_a, mod_b = _module_of(model_a), _module_of(model_b)
    chosen = select_modules(mod_a, target_modules, types)
    names = [n for n, _ in chosen]
    try:
        chosen_b = [(n, mod_b.get_submodule(n)) for n in names]
    except AttributeError as exc:
        raise ValueError(f"the second model lacks a layer of the first: {exc}") from exc
    batches = _Batches(model_a, data, None, batch_size)
    sink_a: dict[str, torch.Tensor] = {}
    sink_b: dict[str, torch.Tensor] = {}
    accs: dict[str, CovarianceAccumulator] = {}
    dims: dict[str, int] = {}
    run_a = BatchRunner(mod_a, batches.run)
    run_b = BatchRunner(mod_b, batches.run, what="batch (second model)")
    handles = _hook_outputs(chosen, batches, samples, sink_a, run_a) + _hook_outputs(chosen_b, batches, samples, sink_b, run_b)
    states = (mod_a.training, mod_b.training)
    mod_a.eval()
    mod_b.eval()
    try:
        with torch.no_grad(), run_a, run_b:
            for batch in track(batches, progress, desc="batches"):
                sink_a.clear()
                sink_b.clear()
                run_a(batch)
                run_b(batch)
                for n in names:
                    Xa, Xb = sink_a[n], sink_b[n]
                    if Xa.shape[0] != Xb.shape[0]:
                        raise ValueError(f"layer {n}: the models gave {Xa.shape[0]} and {Xb.shape[0]} samples")
                    dims[n] = Xa.shape[1]
                    X = torch.cat([Xa.to(torch.float64), Xb.to(torch.float64)], dim=1)
                    accs.setdefault(n, CovarianceAccumulator(X.shape[1], X.device)).update(X)
    finally:
        for handle in handles:
            handle.remove()
        mod_a.train(states[0])
        mod_b.train(states[1])
    if not accs:
        raise ValueError("the data held no batches")
    records = []
    for n in names:
        acc = accs[n]
        a, b = slice(0, dims[n]), slice(dims[n], acc.dim)
        records.append({"name": n, "cka": cka_from_scatter(acc.block(a, b), acc.block(a, a), acc.block(b, b)), "samples": acc.n})
    return AnalysisTable(records, [], None, ("cka",), {"seconds": time.perf_counter() - start, "samples": samples})
