"""Per-layer calibration statistics for compression: input Grams and, optionally, the Gram of
the model-output gradients at each layer's output (for the ``fisher`` method and the budget)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..calibrate import InputStats, collect_input_stats, current_token_mask, layer_inputs, run_batch, token_mask

__all__ = ["LayerStats", "collect_layer_stats", "model_output"]


@dataclass
class LayerStats:
    """Calibration statistics of one layer.

    Attributes
    ----------
    inputs : InputStats
        Gram of the layer's input vectors (d_in, d_in) and mean |x|.
    gradients : InputStats or None
        Gram of ``d(z . f(x)) / d(layer output)`` for random ``z`` (d_out, d_out), if collected.
    """

    inputs: InputStats
    gradients: InputStats | None = None

    def input_gram(self) -> torch.Tensor:
        """``E[x x^T]``, shape (d_in, d_in), float64."""
        return self.inputs.gram / max(self.inputs.count, 1)

    def output_gram(self) -> torch.Tensor | None:
        """``E[g g^T]``, shape (d_out, d_out), float64; None without gradient statistics."""
        if self.gradients is None or self.gradients.count == 0:
            return None
        return self.gradients.gram / self.gradients.count

    @property
    def abs_mean(self) -> torch.Tensor:
        """Mean |x| per input feature, shape (d_in,)."""
        return self.inputs.abs_mean

    def group(self, index: int, groups: int) -> "LayerStats":
        """The statistics of one group of a grouped convolution (diagonal blocks of the Grams)."""
        if groups == 1:
            return self
        return LayerStats(_block(self.inputs, index, groups), None if self.gradients is None else _block(self.gradients, index, groups))


def _block(stats: InputStats, index: int, groups: int) -> InputStats:
    size = stats.gram.shape[0] // groups
    part = slice(index * size, (index + 1) * size)
    return InputStats(stats.gram[part, part], stats.abs_sum[part], stats.count)


def model_output(result: Any) -> torch.Tensor:
    """The tensor a model's forward result stands for: a sentence embedding, logits, the last
    hidden state, or the first tensor found."""
    if isinstance(result, torch.Tensor):
        return result
    if isinstance(result, dict) or hasattr(result, "keys"):
        for key in ("sentence_embedding", "logits", "last_hidden_state"):
            if key in result and isinstance(result[key], torch.Tensor):
                return result[key]
        for value in result.values():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                return value
    if isinstance(result, (tuple, list)):
        for value in result:
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                return value
    raise TypeError(f"cannot find an output tensor in a {type(result).__name__}")


def _with_mask(mask, record, module, grad) -> None:
    with token_mask(mask):
        record(module, grad)


def _collect_gradient_stats(
    model: nn.Module,
    targets: list[tuple[str, nn.Module]],
    batches: Iterable[Any],
    forward: Callable[[Any], Any] | None,
    *,
    probes: int,
    seed: int,
) -> dict[str, InputStats]:
    """Gram of output gradients ``g = d(z . f) / d y`` at every target's output ``y``."""
    stats: dict[str, InputStats] = {}

    def make_hook(name: str):
        def record(module, grad):
            rows = grad.permute(0, 2, 3, 1).reshape(-1, grad.shape[1]) if isinstance(module, nn.Conv2d) else layer_inputs(module, grad)
            if name not in stats:
                stats[name] = InputStats.zeros(rows.shape[1], device=rows.device)
            stats[name].update(rows)

        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor) or not output.is_floating_point():
                return
            if not output.requires_grad:
                # Parameters are frozen, so the first target's output is a leaf: make it one
                # that asks for its gradient, and everything downstream follows.
                output.requires_grad_(True)
            # The token mask of this batch is bound now; the gradient arrives later.
            mask = current_token_mask()
            output.register_hook(lambda grad: _with_mask(mask, record, module, grad))
        return hook

    params = [p for p in model.parameters()]
    saved = [(p.grad, p.requires_grad) for p in params]
    generator = torch.Generator().manual_seed(seed)
    handles = [module.register_forward_hook(make_hook(name)) for name, module in targets]
    try:
        # No weight gradients are needed: only the gradients at the targets' outputs.
        for p in params:
            p.requires_grad_(False)
        with torch.enable_grad():
            for batch in batches:
                output = model_output(run_batch(model, batch, forward))
                if not output.requires_grad:
                    raise ValueError("the model output does not depend on any target layer's output")
                for probe in range(probes):
                    z = torch.randn(output.shape, generator=generator, dtype=output.dtype).to(output.device)
                    (output * z).sum().backward(retain_graph=probe < probes - 1)
    finally:
        for handle in handles:
            handle.remove()
        for p, (grad, requires) in zip(params, saved):
            p.grad = grad
            p.requires_grad_(requires)
    return stats


def collect_layer_stats(
    model: nn.Module,
    targets: list[tuple[str, nn.Module]],
    batches: Iterable[Any],
    forward: Callable[[Any], Any] | None = None,
    *,
    gradients: bool = False,
    probes: int = 2,
    seed: int = 0,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> dict[str, LayerStats]:
    """Input (and optionally output-gradient) statistics for every target layer.

    Parameters
    ----------
    model : nn.Module
        Run in eval mode; its training flag and parameter gradients are restored afterwards.
    targets : list of (name, module)
    batches : iterable
        Re-iterated when ``gradients`` is True, so pass a list, not a generator.
    forward : callable, optional
        ``forward(batch) -> result``.
    gradients : bool
        Also collect the Gram of output gradients (one backward pass per probe and batch).
    probes : int
        Random output directions ``z`` per batch.
    seed : int
        Seed of the probes.
    progress : callable, optional
        Wraps the batch iterable of the first pass.

    Returns
    -------
    dict of name -> LayerStats
    """
    batches = list(batches) if gradients else batches
    was_training = model.training
    model.eval()
    try:
        inputs = collect_input_stats(model, targets, batches, forward, progress=progress)
        grads = _collect_gradient_stats(model, targets, batches, forward, probes=probes, seed=seed) if gradients else {}
    finally:
        model.train(was_training)
    return {name: LayerStats(inputs[name], grads.get(name)) for name, _ in targets}
