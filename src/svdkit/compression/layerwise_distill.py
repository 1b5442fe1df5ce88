"""Layer-wise distillation of a compressed model: a short training of its factors toward the original model.

Each step runs both models on one calibration batch and minimizes, over the parameters of the
low-rank layers only (factors and biases), the relative squared error of every factorized layer's output against the
original layer's output (layer-wise targets keep each layer close to the function it replaces,
which overfits the calibration data less than an end-to-end loss alone) plus the relative error
of the model's output. Both models run in eval mode, so dropout stays off.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

import torch
from torch import nn

from ..progress import ProgressLike, track

from ..layers.lowrank import low_rank_types
from ..batches import output_tensor, run_batch

__all__ = ["layerwise_distill"]

def _capture_outputs(model: nn.Module, names: list[str], store: dict[str, torch.Tensor]) -> list:
    def hook(module, inputs, output, name):
        store[name] = output

    return [model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: hook(m, i, o, name)) for name in names]


def _relative(error: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return error.square().mean() / target.square().mean().clamp_min(1e-12)


def layerwise_distill(
    original: nn.Module,
    compressed: nn.Module,
    batches: list[Any],
    forward: Callable[[nn.Module, Any], Any] | None = None,
    *,
    steps: int = 100,
    lr: float = 1e-4,
    progress: ProgressLike = None,
) -> list[float]:
    """Distil ``compressed`` toward ``original`` on ``batches`` (in place).

    Parameters
    ----------
    original, compressed : nn.Module
        The dense model (left unchanged) and its compressed copy.
    batches : list
        Calibration batches, cycled.
    forward : callable, optional
        ``forward(module, batch) -> output`` (default :func:`svdkit.batches.run_batch`).
    steps : int
        Optimizer steps (Adam).
    lr : float
        Learning rate.
    progress : bool or callable, optional
        Progress over the steps (see :mod:`svdkit.progress`).

    Returns
    -------
    list of float
        The loss at each step.
    """
    if steps < 1 or lr <= 0:
        raise ValueError(f"layerwise_distill needs steps >= 1 and lr > 0, got steps={steps}, lr={lr}")
    names = [name for name, module in compressed.named_modules() if isinstance(module, low_rank_types())]
    if not names:
        raise ValueError("the model has no factorized layers to distil")
    factors = [p for name in names for p in compressed.get_submodule(name).parameters()]
    flags = {p: p.requires_grad for p in compressed.parameters()}
    modes = original.training, compressed.training
    targets: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    handles = _capture_outputs(original, names, targets) + _capture_outputs(compressed, names, outputs)
    losses = []
    try:
        original.eval()
        compressed.eval()
        for p in compressed.parameters():
            p.requires_grad_(False)
        for p in factors:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(factors, lr=lr)
        cycle = itertools.cycle(batches)
        for _ in track(range(steps), progress, desc="layer-wise distillation steps"):
            batch = next(cycle)
            with torch.no_grad():
                reference = output_tensor(run_batch(original, batch, forward))
            result = output_tensor(run_batch(compressed, batch, forward))
            layer_loss = sum(_relative(outputs[n] - targets[n], targets[n]) for n in names) / len(names)
            loss = layer_loss + _relative(result - reference, reference)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        original.train(modes[0])
        compressed.train(modes[1])
    return losses
