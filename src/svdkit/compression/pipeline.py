"""``compress()``: targets -> calibration statistics -> spectra -> ranks -> factors -> new layers."""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ..calibrate import run_batch
from ..causal_lm import is_causal_lm
from ..distributed import current_group, shard
from ..progress import ProgressLike
from ..layers.lowrank import low_rank_class
from ..surgery import find_targets, replace_module, shared_weight_groups
from ..views import get_view
from .blocks import BlockHome, BlockStack, find_blocks
from .config import CompressConfig
from .heal import heal
from .plan import LayerPlan, plan_layers
from .ranks import choose_ranks
from .refit import refit
from .report import CompressionReport, LayerReport, peak_memory
from .sequential import compress_blocks, measure_curvature
from .stats import LayerStats, collect_layer_stats

__all__ = ["compress", "compress_sweep"]

def _check_weights(targets: list[tuple[str, nn.Module]]) -> None:
    for name, module in targets:
        for what in ("weight", "bias"):
            tensor = getattr(module, what, None)
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                continue
            tensor = tensor.detach()
            if bool(torch.isfinite(tensor.sum())):  # the sum of finite values is finite
                continue
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise ValueError(f"layer {name} ({type(module).__name__}, {what} {tuple(tensor.shape)}) has {bad} non-finite values")


def _check_token_batches(model: nn.Module, calibration: list[Any]) -> None:
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


def _tied_followers(model: nn.Module, targets: list[tuple[str, nn.Module]]) -> dict[str, list[str]]:
    """For each group of layers that hold one weight (tied weights) and include a target: the
    layer factorized for all of them -> the others, which will share its factors.

    The factorized one is a targeted Linear-like member when there is one (it has calibration
    statistics; an embedding's input is a token id), else the first targeted member. Members
    that were not targeted are pulled in: factorizing one alone would untie the weights.
    """
    names = {name for name, _ in targets}
    followers: dict[str, list[str]] = {}
    for group in shared_weight_groups(model):
        targeted = [n for n in group if n in names]
        if not targeted:
            continue
        primary = next((n for n in targeted if get_view(model.get_submodule(n)).kind != "embedding"), targeted[0])
        followers[primary] = [n for n in group if n != primary]
    return followers


def _tie_follower(out: nn.Module, name: str, primary: str, factorized: nn.Module | None, primary_row: LayerReport) -> LayerReport:
    """Replace the tied layer ``name`` by one that shares ``factorized``'s factors; its report row
    counts no parameters (they are counted in ``primary``'s row)."""
    dense = out.get_submodule(name)
    row = LayerReport(name=name, kind=get_view(dense).kind, shape=primary_row.shape, method=primary_row.method)
    if factorized is None:
        row.skip_reason = f"its weight is tied to {primary}'s, which stays dense"
        return row
    follower = low_rank_class(dense).from_factors(dense, factorized.u.detach(), factorized.v.detach())
    follower.share_factors_with(factorized)
    replace_module(out, name, follower)
    row.rank = primary_row.rank
    row.skip_reason = f"its weight is tied to {primary}'s: shares its factors (their parameters are counted there)"
    return row


def _untie_in_config(model: nn.Module) -> None:
    """A factorized tied head shares its factors with the embedding itself; a transformers
    config that still asks to tie ``lm_head.weight`` to the embedding's weight (which no longer
    exist) would make ``tie_weights()`` fail, so it stops asking."""
    config = getattr(model, "config", None)
    if getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False


def _curvature(config: CompressConfig, model: nn.Module) -> str:
    if config.curvature != "auto":
        return config.curvature
    return "labels" if is_causal_lm(model) else "probes"


def _choose_pipeline(model: nn.Module, targets: list[tuple[str, nn.Module]], config: CompressConfig) -> BlockStack | None:
    """The stack of blocks to compress block by block, or None for the whole-model path."""
    if config.pipeline == "model" or (config.pipeline == "auto" and (config.refit or config.heal_steps)):
        return None
    stack = find_blocks(model, [name for name, _ in targets])
    if config.pipeline == "blocks":
        if stack is None:
            outside = [name for name, _ in targets][:5]
            raise ValueError(
                "pipeline='blocks' needs every target inside one stack of identical blocks (an nn.ModuleList), "
                f"but no such stack holds all of them (e.g. {outside}); use pipeline='model' or narrow target_modules"
            )
        return stack
    return stack if is_causal_lm(model) else None


def compress(
    model: nn.Module,
    config: CompressConfig | None = None,
    calibration: Iterable[Any] | None = None,
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    inplace: bool = False,
    progress: ProgressLike = False,
) -> tuple[nn.Module, CompressionReport]:
    """Replace a model's layers by low-rank factorizations.

    Parameters
    ----------
    model : nn.Module
        Left unchanged unless ``inplace`` is True.
    config : CompressConfig, optional
        Defaults to ``CompressConfig()`` (``fisher`` method, 60 % of the parameters per layer).
    calibration : iterable of batches, optional
        Needed by every method but ``svd``: tensors (token ids of shape (batch, seq) for a
        language model, see :func:`svdkit.tokens.calibration_tokens`), dicts of tensors
        (transformers), or lists of strings together with a ``forward`` that tokenizes them
        (:meth:`svdkit.models.LoadedModel.forward`).
    forward : callable, optional
        ``forward(module, batch) -> output`` runs a model (the original or the compressed copy)
        on one batch; defaults to :func:`svdkit.calibrate.run_batch`.
    inplace : bool
        Modify ``model`` itself instead of a deep copy.
    progress : bool or callable
        Show progress (see :mod:`svdkit.progress`).

    Returns
    -------
    compressed : nn.Module
    report : CompressionReport
        Per-layer rows, totals, which pipeline ran (``"model"`` or ``"blocks"``), wall time and
        the process's peak memory.

    Raises
    ------
    ValueError
        No layer matched, a weight is not finite, calibration data is missing, non-finite or
        never reaches a target, or a rank/budget is impossible.
    """
    return _compress_all(model, [config or CompressConfig()], calibration, forward=forward, inplace=inplace, progress=progress)[0]


def compress_sweep(
    model: nn.Module,
    config: CompressConfig,
    budgets: Sequence[float],
    calibration: Iterable[Any] | None = None,
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    progress: ProgressLike = False,
) -> list[tuple[nn.Module, CompressionReport]]:
    """:func:`compress` at several global budgets, measuring what they share once.

    The whole-model pipeline computes the calibration statistics and every layer's
    factorization once; each budget only chooses its ranks and builds its copy. The block
    pipeline runs its curvature pass once; its compression pass fits each block to what the
    compressed blocks before it produce, which depends on the budget, so it runs per budget.

    Parameters
    ----------
    model : nn.Module
        Left unchanged.
    config : CompressConfig
        Everything but the budget.
    budgets : sequence of float
        Fractions of the targeted parameters to keep, each in (0, 1].
    calibration, forward, progress
        As for :func:`compress`.

    Returns
    -------
    list of (compressed, report)
        One per budget, in order.
    """
    if not budgets:
        raise ValueError("compress_sweep needs at least one budget")
    configs = [dataclasses.replace(config, budget=budget) for budget in budgets]
    return _compress_all(model, configs, calibration, forward=forward, inplace=False, progress=progress)


def _compress_all(
    model: nn.Module,
    configs: list[CompressConfig],
    calibration: Iterable[Any] | None,
    *,
    forward: Callable[[nn.Module, Any], Any] | None,
    inplace: bool,
    progress: ProgressLike,
) -> list[tuple[nn.Module, CompressionReport]]:
    """One result per config; the configs differ in their budget only."""
    config = configs[0]
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
    if config.needs_data and calibration is None:
        raise ValueError(
            f"method {config.method!r} (refit={config.refit}, heal_steps={config.heal_steps}) needs calibration data; "
            "pass calibration= or use method='svd' alone"
        )
    calibration = list(calibration) if calibration is not None else None
    if calibration is not None:
        _check_token_batches(model, calibration)
    stack = _choose_pipeline(model, targets, config) if config.needs_data else None
    group = current_group()
    if group.active and stack is None:
        raise ValueError(
            f"compressing with {group.world} processes runs the block pipeline, but this model or config takes the "
            "whole-model one (pipeline='blocks' needs every target inside one stack of blocks, and calibration data)"
        )
    if group.active:
        calibration = shard(calibration, group)
    device = config.device or (group.device if group.device.type == "cuda" else None)
    params_before = sum(p.numel() for p in model.parameters())
    results = []
    if stack is not None:
        curvature = _curvature(config, model)
        home = BlockHome(device)
        measured = measure_curvature(model, stack, targets, calibration, config, forward=forward, curvature=curvature,
                                     home=home, progress=progress, group=group)
        try:
            for cfg in configs:
                out = model if inplace else copy.deepcopy(model)
                out_stack = BlockStack(stack.name, out.get_submodule(stack.name))
                rows, run = compress_blocks(model, out, out_stack, targets, calibration, cfg, forward=forward,
                                            measured=measured, home=home, progress=progress, group=group)
                report = CompressionReport(method=cfg.method, model_params_before=params_before, layers=rows, pipeline="blocks")
                report.timings.update(run.seconds)
                results.append((out, report))
        finally:
            if measured is not None:
                measured.close()
    else:
        shared = _plan_whole(model, targets, calibration, config, forward, progress)
        for cfg in configs:
            out = model if inplace else copy.deepcopy(model)
            report = CompressionReport(method=cfg.method, model_params_before=params_before)
            _apply_whole(model, out, shared, calibration, cfg, forward, report, progress)
            results.append((out, report))
    for out, report in results:
        report.model_params_after = sum(p.numel() for p in out.parameters())
        report.seconds = time.perf_counter() - start
        report.peak_memory = peak_memory()
    return results


@dataclass
class _WholePlan:
    """What every budget of the whole-model pipeline shares: the factorized targets and their tied followers."""

    plans: list[LayerPlan]
    tied: dict[str, list[str]]
    other_params: int


def _plan_whole(
    model: nn.Module,
    targets: list[tuple[str, nn.Module]],
    calibration: list[Any] | None,
    config: CompressConfig,
    forward: Callable[[nn.Module, Any], Any] | None,
    progress: ProgressLike,
) -> _WholePlan:
    """Every layer's statistics from whole-model forwards (and backwards), then every factorization."""
    tied = _tied_followers(model, targets)
    followers = {name for names in tied.values() for name in names}
    targets = [(n, m) for n, m in targets if n not in followers]
    stats: dict[str, LayerStats] = {}
    data_targets = [(n, m) for n, m in targets if get_view(m).kind != "embedding"]
    if config.method != "svd" and data_targets:
        stats = collect_layer_stats(
            model, data_targets, calibration, forward,
            gradients=config.method == "fisher", curvature=_curvature(config, model), probes=config.probes,
            seed=config.seed, gradient_batches=config.gradient_batches, progress=progress,
        )
    plans = plan_layers(targets, stats, config, progress)
    others = sum(p.numel() for p in model.parameters()) - sum(plan.dense_params for plan in plans)
    return _WholePlan(plans, tied, others)


def _apply_whole(
    model: nn.Module,
    out: nn.Module,
    shared: _WholePlan,
    calibration: list[Any] | None,
    config: CompressConfig,
    forward: Callable[[nn.Module, Any], Any] | None,
    report: CompressionReport,
    progress: ProgressLike,
) -> None:
    """Choose the ranks of one budget, replace the layers of ``out``, then refit and heal."""
    run = forward if forward is not None else (lambda module, batch: run_batch(module, batch))
    plans = shared.plans
    ranks = choose_ranks(plans, config, other_params=shared.other_params)
    rows = []
    for plan, k in zip(plans, ranks):
        row = plan.report(k)
        new = plan.build(row.rank) if row.rank is not None else None
        if new is not None:
            replace_module(out, plan.name, new)
        rows.append(row)
        report.layers.append(row)
        for follower in shared.tied.get(plan.name, []):
            report.layers.append(_tie_follower(out, follower, plan.name, new, row))
        if new is not None and plan.name in shared.tied:
            _untie_in_config(out)
    for _ in range(config.refit):
        plans = refit(model, out, plans, [row.rank for row in rows], calibration, run, damping=config.damping, progress=progress)
        for row, plan in zip(rows, plans):
            if row.rank is not None:
                row.method = plan.factorizations[0].method
    if config.heal_steps:
        losses = heal(model, out, calibration, run, steps=config.heal_steps, lr=config.heal_lr, progress=progress)
        report.quality["heal loss first/last"] = f"{losses[0]:.4g} -> {losses[-1]:.4g}"
