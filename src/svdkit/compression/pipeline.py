"""``compress()``: targets -> calibration statistics -> spectra -> ranks -> factors -> new layers.

The entry point of both pipelines: it checks the input (:mod:`svdkit.compression.checks`),
chooses the pipeline, runs the one :class:`~svdkit.compression.compressor.LayerCompressor`
through its driver (:mod:`~svdkit.compression.model_driver` or
:mod:`~svdkit.compression.block_driver`), distils the result layer by layer when asked, and fills the report.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from typing import Any, Callable, Iterable, Sequence

from torch import nn

from ..causal_lm import is_causal_lm
from ..distributed import current_group, shard
from ..experts import expert_banks, fold_dense_banks
from ..export.plain_save import guard_plain_save
from ..progress import ProgressLike
from .block_driver import BlockDriver
from .blocks import BlockHome, BlockStack, find_blocks
from .checks import calibration_digest, check_same_calibration, check_token_batches, check_weights, reaches_experts, select_targets
from .compressor import LayerCompressor
from .config import CompressConfig
from .layerwise_distill import layerwise_distill
from .model_driver import apply_plan, plan_model
from .report import CompressionReport, peak_memory

__all__ = ["choose_pipeline", "compress", "compress_sweep"]

Forward = Callable[[nn.Module, Any], Any]


def choose_pipeline(model: nn.Module, targets: list[tuple[str, nn.Module]], config: CompressConfig) -> BlockStack | None:
    """The stack of blocks to compress block by block, or None for the whole-model path (for a config
    that needs calibration data; ``targets`` as :func:`svdkit.compression.checks.select_targets` gives them)."""
    if config.pipeline == "model" or (config.pipeline == "auto" and (config.refit or config.layerwise_distill_steps)):
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
        on one batch; defaults to :func:`svdkit.batches.run_batch`.
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
    forward: Forward | None,
    inplace: bool,
    progress: ProgressLike,
) -> list[tuple[nn.Module, CompressionReport]]:
    """One result per config; the configs differ in their budget only."""
    config = configs[0]
    start = time.perf_counter()
    group = current_group()
    params_before = sum(p.numel() for p in model.parameters())
    with contextlib.ExitStack() as scope:
        with group.checked():  # a bad input on one rank stops every rank with its message, before any collective
            # A mixture's fused experts are unfolded into one module per expert while compressing
            # (sharing their storage); the compressed copies keep the banks whose experts they factorize.
            scope.enter_context(expert_banks(model, keep=inplace, unfold=lambda name: reaches_experts(config, name)))
            targets, calibration, stack = _prepare(model, config, calibration, inplace, group)
        if group.active:
            check_same_calibration(group, calibration_digest(calibration))
            calibration = shard(calibration, group)
        if stack is not None:
            device = config.device or (group.device if group.device.type == "cuda" else None)
            results = _by_blocks(model, stack, targets, calibration, configs, forward, inplace, BlockHome(device), progress, group)
        else:
            results = _whole_model(model, targets, calibration, configs, forward, inplace, progress)
    for (out, report), cfg in zip(results, configs):
        fold_dense_banks(out)
        guard_plain_save(out)
        if cfg.layerwise_distill_steps:
            losses = layerwise_distill(model, out, calibration, forward, steps=cfg.layerwise_distill_steps,
                                       lr=cfg.layerwise_distill_lr, progress=progress)
            report.quality["layer-wise distillation loss first/last"] = f"{losses[0]:.4g} -> {losses[-1]:.4g}"
        report.model_params_before = params_before
        report.model_params_after = sum(p.numel() for p in out.parameters())
        report.seconds = time.perf_counter() - start
        report.peak_memory = peak_memory()
    return results


def _prepare(model: nn.Module, config: CompressConfig, calibration: Iterable[Any] | None, inplace: bool, group
             ) -> tuple[list[tuple[str, nn.Module]], list[Any] | None, BlockStack | None]:
    """Every check that needs no work, and the pipeline: (the targets, the calibration as a list,
    the stack of blocks or None for the whole-model pipeline)."""
    targets = select_targets(model, config)
    check_weights(targets)
    if config.needs_data and calibration is None:
        raise ValueError(
            f"method {config.method!r} (refit={config.refit}, layerwise_distill_steps={config.layerwise_distill_steps}) needs calibration data; "
            "pass calibration= or use a method that needs none (method='svd') without refit or layer-wise distillation"
        )
    if config.layerwise_distill_steps and inplace:
        raise ValueError("layerwise_distill_steps distils the compressed model toward the dense one, which inplace=True does not keep: pass inplace=False")
    calibration = list(calibration) if calibration is not None else None
    if calibration is not None:
        check_token_batches(model, calibration)
        LayerCompressor(config, model).check_calibration(calibration)
    stack = choose_pipeline(model, targets, config) if config.needs_data else None
    if config.refine_epochs and stack is None:
        raise ValueError(
            f"refine_epochs={config.refine_epochs}: block refinement runs in the block pipeline, but this model or config takes the "
            "whole-model one (refit or layer-wise distillation, a model that is not a causal LM, or targets outside one stack of "
            "blocks): set refine_epochs=0 (--refine-epochs 0), or pipeline='blocks'"
        )
    if group.active and stack is None:
        raise ValueError(
            f"compressing with {group.world} processes runs the block pipeline, but this model or config takes the "
            "whole-model one (pipeline='blocks' needs every target inside one stack of blocks, and calibration data)"
        )
    return targets, calibration, stack


def _by_blocks(model: nn.Module, stack: BlockStack, targets: list[tuple[str, nn.Module]], calibration: list[Any],
               configs: list[CompressConfig], forward: Forward | None, inplace: bool, home: BlockHome, progress: ProgressLike,
               group) -> list[tuple[nn.Module, CompressionReport]]:
    """The block pipeline: pass 1 once, pass 2 per budget."""
    drivers = [BlockDriver(LayerCompressor(cfg, model, targets), stack, targets, calibration, forward=forward, home=home,
                           group=group, progress=progress) for cfg in configs]
    measured = drivers[0].measure(model)
    results = []
    try:
        for cfg, driver in zip(configs, drivers):
            out = model if inplace else copy.deepcopy(model)
            rows, run = driver.compress(model, out, measured)
            report = CompressionReport(method=cfg.method, layers=rows, pipeline="blocks",
                                       refinement=[r.to_dict() for r in run.refinement])
            report.timings.update(run.seconds)
            results.append((out, report))
    finally:
        if measured is not None:
            measured.close()
    return results


def _whole_model(model: nn.Module, targets: list[tuple[str, nn.Module]], calibration: list[Any] | None,
                 configs: list[CompressConfig], forward: Forward | None, inplace: bool, progress: ProgressLike
                 ) -> list[tuple[nn.Module, CompressionReport]]:
    """The whole-model pipeline: statistics and factorizations once, ranks and layers per budget."""
    shared = plan_model(model, LayerCompressor(configs[0], model, targets), targets, calibration, forward, progress)
    results = []
    for cfg in configs:
        out = model if inplace else copy.deepcopy(model)
        rows = apply_plan(model, out, shared, LayerCompressor(cfg, model, targets), calibration, forward, progress)
        results.append((out, CompressionReport(method=cfg.method, layers=rows)))
    return results

