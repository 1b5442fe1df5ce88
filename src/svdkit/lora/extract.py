"""Extract LoRA adapters from a fine-tuned model: per layer, the truncated SVD of ``W_ft - W_base``."""

from __future__ import annotations

import copy
import math
from typing import Iterable

from torch import nn

from ..layers.lora import wrap_lora
from ..linalg import (
    SVD_METHODS,
    RankLike,
    RankSpec,
    SVDMethod,
    energy_rank,
    layer_seed,
    split_factors,
    svdvals,
    truncated_svd,
    uses_randomized,
)
from ..progress import ProgressLike, track
from ..surgery import replace_module
from ..views import weight_matrix
from .delta import weight_deltas
from .report import ExtractionReport, LayerExtraction
from .state import mark_only_lora_trainable

__all__ = ["ExtractionReport", "LayerExtraction", "extract_lora"]


def extract_lora(
    base_model: nn.Module,
    finetuned_model: nn.Module,
    r: RankLike = 16,
    *,
    target_modules: str | Iterable[str] | None = None,
    exclude_modules: str | Iterable[str] = (),
    lora_alpha: float | None = None,
    svd_method: SVDMethod = "exact",
    seed: int = 0,
    progress: ProgressLike = False,
) -> tuple[nn.Module, ExtractionReport]:
    """LoRA adapters that reproduce a fine-tune: ``s B A = [W_ft - W_base]_r`` per layer.

    Parameters
    ----------
    base_model, finetuned_model : nn.Module
        Same architecture; neither is modified.
    r : int, Energy, ErrorTol, RankRatio or ParamRatio
        An int is the rank of every adapter (it must not exceed a layer's ``min(out, d)``);
        ``Energy(0.9)`` keeps 90 % of each layer's change energy, ``ErrorTol(0.1)`` a relative
        error of at most 10 % (resolved on the spectrum of each layer's weight change).
    target_modules, exclude_modules
        PEFT-style layer selection (default: every Linear, Conv1D and Conv2d but the output head).
    lora_alpha : float or None
        ``lora_alpha`` of every adapter; None sets ``lora_alpha = r`` per layer (scaling 1).
    svd_method : {"auto", "exact", "randomized"}
        The values of :class:`~svdkit.lora.LoRAConfig`'s ``svd_method``
        (:data:`svdkit.linalg.SVD_METHODS`). ``"exact"`` (the default): float64 SVDs give the
        factors and the report. ``"randomized"`` (int ranks only): the factors come from
        :func:`svdkit.linalg.randomized_svd` and the report's ranks from float32 singular
        values; faster on large layers. ``"auto"``: randomized for a layer whose int rank is
        below a tenth of ``min(out, d)``, exact otherwise (:func:`svdkit.linalg.uses_randomized`).
    seed : int
        Seed of the randomized SVD (layer ``i`` uses :func:`svdkit.linalg.layer_seed` ``(seed, i)``).
    progress : bool or callable
        Progress over the layers (:func:`svdkit.progress.track`).

    Returns
    -------
    model : nn.Module
        A copy of ``base_model`` with adapters on every changed layer (only the adapters
        trainable), in the training mode of ``base_model``.
    report : ExtractionReport

    Raises
    ------
    ValueError
        For models of different architectures, a non-finite weight (naming the layer and the
        model), an int rank above a layer's ``min(out, d)``, ``lora_alpha <= 0``, an unknown
        ``svd_method``, or a spectrum-based rank with ``svd_method="randomized"``.

    Notes
    -----
    The differences and decompositions run in float64, so a weight change of rank ``<= r`` is
    recovered to float32 precision. The factors come from :func:`svdkit.linalg.truncated_svd`
    and are split evenly by :func:`svdkit.linalg.split_factors`.
    """
    rank, alpha = r, lora_alpha
    if svd_method not in SVD_METHODS:
        raise ValueError(f"svd_method must be one of {SVD_METHODS}, got {svd_method!r}")
    is_int = isinstance(rank, int) and not isinstance(rank, bool)
    if not is_int and not isinstance(rank, RankSpec):
        raise ValueError(f"r must be an int or a rank spec such as Energy(0.9) or ErrorTol(0.1), got {rank!r}")
    if is_int and rank < 1:
        raise ValueError(f"r must be >= 1, got {rank}")
    if not is_int and svd_method == "randomized":
        raise ValueError(f"r={rank!r} needs each layer's full spectrum: use svd_method='exact' or 'auto'")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0):
        raise ValueError(f"lora_alpha must be a finite number > 0 (or None for lora_alpha = r), got {alpha!r}")
    deltas = weight_deltas(base_model, finetuned_model, target_modules=target_modules, exclude_modules=exclude_modules)
    if is_int:
        too_small = [(n, tuple(d.shape)) for n, d in deltas.items() if rank > min(d.shape)]
        if too_small:
            name, shape = too_small[0]
            raise ValueError(
                f"rank {rank} exceeds min(out, in) = {min(shape)} of layer {name!r} ({shape[0]}x{shape[1]}); "
                f"{len(too_small)} layer(s) are too small: lower the rank, exclude them, or use Energy/ErrorTol"
            )

    plans, reports, unchanged = [], [], []
    for index, (name, delta) in enumerate(track(list(deltas.items()), progress, desc="extracting adapters")):
        total = float(delta.square().sum())
        if total == 0.0:
            unchanged.append(name)
            continue
        try:
            factors, stats = truncated_svd(delta, rank, svd_method=svd_method, seed=layer_seed(seed, index))
            randomized = uses_randomized(svd_method, rank, tuple(delta.shape))
            spectrum = svdvals(delta.float() if randomized else delta).double()
        except (ValueError, RuntimeError) as exc:
            raise ValueError(f"extracting layer {name!r} ({delta.shape[0]}x{delta.shape[1]}) failed: {exc}") from exc
        k = stats.rank
        kept = min(max(float(stats.retained_energy), 0.0), 1.0)
        layer_alpha = float(alpha) if alpha is not None else float(k)
        B, A = split_factors(factors.U, factors.S, factors.Vh, scale=layer_alpha / k)
        base_norm = float(weight_matrix(base_model.get_submodule(name)).detach().double().norm())
        plans.append((name, k, layer_alpha, B, A))
        reports.append(
            LayerExtraction(
                name=name,
                shape=(int(delta.shape[0]), int(delta.shape[1])),
                rank=k,
                lora_alpha=layer_alpha,
                energy_captured=kept,
                relative_error=math.sqrt(max(1.0 - kept, 0.0)),
                rank_90=int(energy_rank(spectrum, 0.90)),
                rank_99=int(energy_rank(spectrum, 0.99)),
                delta_norm=math.sqrt(total),
                relative_change=math.sqrt(total) / base_norm if base_norm > 0 else math.inf,
            )
        )
    if not plans:
        raise ValueError("the fine-tuned model's selected weights equal the base model's: nothing to extract")

    model = copy.deepcopy(base_model)
    for name, k, layer_alpha, B, A in plans:
        layer = wrap_lora(model.get_submodule(name), k, layer_alpha)
        layer.set_factors(B, A)
        replace_module(model, name, layer)
    mark_only_lora_trainable(model)
    spec = rank if is_int else rank.to_dict()  # type: ignore[union-attr]
    return model, ExtractionReport(tuple(reports), tuple(unchanged), spec, svd_method)
