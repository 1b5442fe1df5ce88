"""The whole-model pipeline: every target's statistics from whole-model forwards (and backwards),
then every factorization, then ranks and replacements.

For encoders and small models, and when ``refit`` asks for the dense and compressed models side
by side. Each calibration batch runs forward once with the compressor's recorders on every
target; on the first ``gradient_batches`` batches the backward passes of the curvature estimate
record the output-gradient Grams (no weight gradients are computed). What every budget shares
(the statistics and factorizations) is computed once, in :func:`plan_model`; each budget then
only chooses its ranks and builds its copy (:func:`apply_plan`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..batches import BatchRunner, NonFiniteData
from ..progress import ProgressLike, track
from ..views import get_view
from .compressor import LayerCompressor, TiedLayers
from .config import CompressConfig
from .plan import LayerPlan
from .refit import refit
from .report import LayerReport
from .statistics import LayerStats

__all__ = ["ModelPlan", "apply_plan", "model_statistics", "plan_model"]


@dataclass
class ModelPlan:
    """What every budget of the whole-model pipeline shares.

    Attributes
    ----------
    plans : list of LayerPlan
        The factorized targets (tied followers left out).
    tied : TiedLayers
    other_params : int
        Parameters of the model outside the factorized targets.
    """

    plans: list[LayerPlan]
    tied: TiedLayers
    other_params: int


def model_statistics(
    model: nn.Module,
    compressor: LayerCompressor,
    targets: list[tuple[str, nn.Module]],
    batches: list[Any],
    forward: Callable[[nn.Module, Any], Any] | None,
    progress: ProgressLike = None,
) -> dict[str, LayerStats]:
    """Every target's statistics from one forward per batch (and the curvature's backward passes
    on the first ``gradient_batches`` batches, when the method needs gradients).

    ``model`` runs in eval mode; its training flag, ``requires_grad`` flags and gradients are
    restored.

    Raises
    ------
    NonFiniteData
        A batch gave NaN or infinite inputs, gradients or outputs (naming the batch and layer).
    ValueError
        No batch, a target never reached, or a model output that depends on no target.
    """
    config = compressor.config
    was_training = model.training
    params = list(model.parameters())
    saved = [(p.grad, p.requires_grad) for p in params]
    generator = compressor.generator()
    n_batches = 0
    model.eval()
    try:
        for p in params:  # only the gradients at the targets' outputs are needed
            p.requires_grad_(False)
        with compressor.recording(targets) as recording, compressor.experts.counting(model), \
                BatchRunner(model, forward, what="calibration batch") as run:
            for index, batch in enumerate(track(batches, progress, desc="calibration batches")):
                recording.next_batch(index)
                n_batches += 1
                with_gradients = compressor.needs_gradients and (config.gradient_batches is None or index < config.gradient_batches)
                with torch.set_grad_enabled(with_gradients):
                    result = run(batch)
                if not with_gradients:
                    continue
                for objective in compressor.objectives(result, batch, generator):
                    if not objective.requires_grad:
                        raise ValueError("the model output does not depend on any target layer's output")
                    if not bool(torch.isfinite(objective.detach()).all()):
                        raise NonFiniteData(f"calibration batch {index}: the model's output is NaN or infinite")
                    objective.backward(retain_graph=True)
                del result
    finally:
        for p, (grad, requires) in zip(params, saved):
            p.grad = grad
            p.requires_grad_(requires)
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("the calibration data held no batches")
    recording.check_reached()
    return compressor.experts.pooled(recording.statistics())


def plan_model(
    model: nn.Module,
    compressor: LayerCompressor,
    targets: list[tuple[str, nn.Module]],
    batches: list[Any] | None,
    forward: Callable[[nn.Module, Any], Any] | None,
    progress: ProgressLike = None,
) -> ModelPlan:
    """Every target's statistics (when the method reads any), then every factorization."""
    tied = TiedLayers.find(model, targets)
    targets = tied.primaries(targets)
    stats: dict[str, LayerStats] = {}
    calibrated = [(n, m) for n, m in targets if get_view(m).calibrated]
    if compressor.needs_inputs and calibrated:
        stats = model_statistics(model, compressor, calibrated, batches, forward, progress)
    plans = compressor.plans(targets, stats, progress)
    others = sum(p.numel() for p in model.parameters()) - sum(plan.dense_params for plan in plans)
    return ModelPlan(plans, tied, others)


def apply_plan(
    model: nn.Module,
    out: nn.Module,
    shared: ModelPlan,
    compressor: LayerCompressor,
    batches: list[Any] | None,
    forward: Callable[[nn.Module, Any], Any] | None,
    progress: ProgressLike = None,
) -> list[LayerReport]:
    """Choose one budget's ranks, replace the layers of ``out`` (in place) and refit them.

    Returns
    -------
    list of LayerReport
    """
    config: CompressConfig = compressor.config
    ranks = compressor.choose_ranks(shared.plans, other_params=shared.other_params)
    rows = compressor.replace(out, shared.plans, ranks, shared.tied)
    primary_rows = {row.name: row for row in rows}
    plans = shared.plans
    for _ in range(config.refit):
        plans = refit(model, out, plans, [primary_rows[p.name].rank for p in plans], batches, forward,
                      damping=config.damping, progress=progress)
        for plan in plans:
            row = primary_rows[plan.name]
            if row.rank is not None:
                row.method = plan.factorizations[0].method
    return rows
