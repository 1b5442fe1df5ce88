"""``compress()``: targets -> calibration statistics -> spectra -> ranks -> factors -> new layers."""

from __future__ import annotations

import copy
import time
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..calibrate import run_batch
from ..linalg import allocate_ranks, resolve_rank
from ..surgery import check_patterns, find_targets, pattern_value, replace_module
from ..views import get_view
from .config import CompressConfig
from .heal import heal
from .plan import LayerPlan, plan_layers
from .refit import refit
from .report import CompressionReport, LayerReport
from .stats import LayerStats, collect_layer_stats

__all__ = ["compress"]

def _check_weights(targets: list[tuple[str, nn.Module]]) -> None:
    for name, module in targets:
        W = module.weight
        bad = int((~torch.isfinite(W)).sum()) if W.is_floating_point() else 0
        if bad:
            raise ValueError(f"layer {name} ({type(module).__name__}, weight {tuple(W.shape)}) has {bad} non-finite weights")


def _choose_ranks(plans: list[LayerPlan], config: CompressConfig, model: nn.Module) -> list[int | None]:
    """Rank per plan (None: keep dense), from per-layer specs, ``rank_pattern`` or the global budget."""
    check_patterns(config.rank_pattern, [plan.name for plan in plans], field="rank_pattern")
    fixed: dict[int, int] = {}
    for i, plan in enumerate(plans):
        spec = pattern_value(config.rank_pattern, plan.name, None)
        if spec is not None or config.budget is None:
            spec = config.rank if spec is None else spec
            fixed[i] = resolve_rank(plan.factorizations[0].S, spec, plan.shape)
    if config.budget is None:
        return [fixed[i] for i in range(len(plans))]
    free = [i for i in range(len(plans)) if i not in fixed]
    targeted = sum(plan.dense_params for plan in plans)
    if config.budget_scope == "model":
        others = sum(p.numel() for p in model.parameters()) - targeted
        budget = config.budget * (others + targeted) - others
    else:
        budget = config.budget * targeted
    budget -= sum(min(k * plans[i].rank_cost, plans[i].dense_params) for i, k in fixed.items())
    if budget <= 0:
        raise ValueError(
            f"budget {config.budget} of the {config.budget_scope} parameters leaves nothing for the targeted layers "
            "once the other parameters and the rank_pattern layers are paid"
        )
    allocated = allocate_ranks(
        [plans[i].spectrum() for i in free], [plans[i].rank_cost for i in free], [plans[i].dense_params for i in free],
        int(budget), min_rank=config.min_rank,
    )
    ranks: list[int | None] = [None] * len(plans)
    for i, k in fixed.items():
        ranks[i] = k
    for i, k in zip(free, allocated):
        ranks[i] = k
    return ranks


def compress(
    model: nn.Module,
    config: CompressConfig | None = None,
    calibration: Iterable[Any] | None = None,
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    inplace: bool = False,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> tuple[nn.Module, CompressionReport]:
    """Replace a model's layers by low-rank factorizations.

    Parameters
    ----------
    model : nn.Module
        Left unchanged unless ``inplace`` is True.
    config : CompressConfig, optional
        Defaults to ``CompressConfig()`` (``fisher`` method, 60 % of the parameters per layer).
    calibration : iterable of batches, optional
        Needed by every method but ``svd``: tensors, dicts of tensors (transformers), or lists of
        strings together with a ``forward`` that tokenizes them
        (``forward=svdkit.models.LoadedModel.run``).
    forward : callable, optional
        ``forward(module, batch) -> output`` runs a model (the original or the compressed copy)
        on one batch; defaults to :func:`svdkit.calibrate.run_batch`.
    inplace : bool
        Modify ``model`` itself instead of a deep copy.
    progress : callable, optional
        Wraps iterables to show progress (e.g. ``tqdm.tqdm``).

    Returns
    -------
    compressed : nn.Module
    report : CompressionReport

    Raises
    ------
    ValueError
        No layer matched, a weight is not finite, calibration data is missing or never reaches a
        target, or a rank/budget is impossible.
    """
    config = config or CompressConfig()
    start = time.perf_counter()
    targets = find_targets(
        model, config.target_modules, exclude=config.exclude, kinds=config.kinds,
        include_embeddings=config.include_embeddings, include_head=config.include_head,
    )
    if not targets:
        raise ValueError(
            f"no supported layer matched target_modules={config.target_modules!r}, exclude={config.exclude!r}, "
            f"kinds={config.kinds!r} (supported: Linear, transformers Conv1D, Conv2d, Embedding)"
        )
    _check_weights(targets)
    run = forward if forward is not None else (lambda module, batch: run_batch(module, batch))
    if config.refit or config.heal_steps or config.method == "fisher":
        calibration = list(calibration) if calibration is not None else None
    stats: dict[str, LayerStats] = {}
    data_targets = [(n, m) for n, m in targets if get_view(m).kind != "embedding"]
    if config.needs_data and calibration is None:
        raise ValueError(
            f"method {config.method!r} (refit={config.refit}, heal_steps={config.heal_steps}) needs calibration data; "
            "pass calibration= or use method='svd' alone"
        )
    if config.method != "svd" and data_targets:
        stats = collect_layer_stats(
            model, data_targets, calibration, lambda batch: run(model, batch),
            gradients=config.method == "fisher", probes=config.probes, seed=config.seed, progress=progress,
        )
    plans = plan_layers(targets, stats, config, progress)
    ranks = _choose_ranks(plans, config, model)

    out = model if inplace else copy.deepcopy(model)
    report = CompressionReport(method=config.method, model_params_before=sum(p.numel() for p in model.parameters()))
    for plan, k in zip(plans, ranks):
        report.layers.append(_apply(out, plan, k, config))
    for _ in range(config.refit):
        plans = refit(model, out, plans, [row.rank for row in report.layers], calibration, run, damping=config.damping, progress=progress)
        for row, plan in zip(report.layers, plans):
            if row.rank is not None:
                row.method = plan.factorizations[0].method
    if config.heal_steps:
        losses = heal(model, out, calibration, run, steps=config.heal_steps, lr=config.heal_lr, progress=progress)
        report.quality["heal loss first/last"] = f"{losses[0]:.4g} -> {losses[-1]:.4g}"
    report.model_params_after = sum(p.numel() for p in out.parameters())
    report.seconds = time.perf_counter() - start
    return out, report


def _apply(model: nn.Module, plan: LayerPlan, k: int | None, config: CompressConfig) -> LayerReport:
    m, n = plan.shape
    per_vector = plan.groups * m * n if plan.kind != "embedding" else 0
    row = LayerReport(
        name=plan.name, kind=plan.kind, shape=plan.shape, groups=plan.groups,
        params_before=plan.dense_params, params_after=plan.dense_params,
        macs_before=per_vector, macs_after=per_vector,
        method=plan.factorizations[0].method,
        skip_reason="; ".join(sorted({f.note for f in plan.factorizations if f.note})),
    )
    if k is None:
        row.skip_reason = "the budget keeps it dense: its break-even rank is reached"
        return row
    if k * plan.rank_cost >= plan.dense_params:
        row.skip_reason = f"rank {k} >= break-even {m * n / (m + n):.1f}: a factorization would not save parameters"
        return row
    if plan.kind == "embedding" and (plan.module.max_norm is not None or plan.module.sparse):
        row.skip_reason = "embeddings with max_norm or sparse gradients are not factorized"
        return row
    replace_module(model, plan.name, plan.build(k))
    row.rank = k
    row.params_after = k * plan.rank_cost
    row.macs_after = k * plan.rank_cost if plan.kind != "embedding" else k * n
    row.predicted_error = plan.predicted_error(k)
    return row
