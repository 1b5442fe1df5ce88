"""Per-layer calibration statistics for compression: input Grams and, optionally, the Gram of
the model-output gradients at each layer's output (for the ``fisher`` method and the budget)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from ..calibrate import BatchRunner, GradientRecorder, InputRecorder, InputStats, NonFiniteCalibration
from ..progress import ProgressLike, track

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

    def input_whitening(self, damping: float) -> tuple[torch.Tensor, float]:
        """Cholesky factor of ``E[x x^T]`` with relative damping (see :meth:`InputStats.whitening`)."""
        return self.inputs.whitening(damping)

    def output_whitening(self, damping: float) -> tuple[torch.Tensor, float]:
        """Cholesky factor of ``E[g g^T]`` with relative damping; only with gradient statistics."""
        if self.gradients is None:
            raise ValueError("no gradient statistics were collected")
        return self.gradients.whitening(damping)

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


def _input_ids(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor) and not batch.is_floating_point():
        return batch
    if isinstance(batch, dict) and isinstance(batch.get("input_ids"), torch.Tensor):
        return batch["input_ids"]
    return None


def output_objectives(result: Any, batch: Any, curvature: str, probes: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Scalars whose gradients at a layer's output give that layer's output-side curvature.

    ==============  =================================================================
    ``"probes"``    ``z . f(x)`` for ``probes`` random Gaussian ``z`` on the model output
                    (any model): the Gram of the gradients is ``J J^T``
    ``"labels"``    the summed negative log-likelihood of the true next tokens (causal
                    LMs): the Gram of the gradients is the empirical Fisher
    ``"sampled"``   the same at ``probes`` next tokens sampled from the model's own
                    distribution: the true Fisher
    ==============  =================================================================
    """
    if curvature == "probes":
        output = model_output(result)
        for _ in range(probes):
            z = torch.randn(output.shape, generator=generator, dtype=output.dtype).to(output.device)
            yield (output * z).sum()
        return
    logits = model_output(result)
    ids = _input_ids(batch)
    if ids is None or logits.ndim != 3 or tuple(logits.shape[:2]) != tuple(ids.shape):
        raise ValueError(
            f"curvature={curvature!r} needs a causal language model fed token ids: got outputs of shape "
            f"{tuple(logits.shape)} for a {type(batch).__name__} batch"
        )
    logits = logits[:, :-1].float()
    flat = logits.reshape(-1, logits.shape[-1])
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    keep = None if mask is None else mask[:, 1:].reshape(-1).bool().to(flat.device)
    if curvature == "labels":
        targets = ids[:, 1:].reshape(-1).to(flat.device)
        yield _nll(flat, targets, keep)
        return
    if curvature == "sampled":
        probs = torch.softmax(flat.detach(), dim=-1).cpu()
        for _ in range(probes):
            targets = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(flat.device)
            yield _nll(flat, targets, keep)
        return
    raise ValueError(f"unknown curvature {curvature!r}; choose 'probes', 'labels' or 'sampled'")


def _nll(flat: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    if keep is not None:
        flat, targets = flat[keep], targets[keep]
    return torch.nn.functional.cross_entropy(flat, targets, reduction="sum")


def collect_layer_stats(
    model: nn.Module,
    targets: list[tuple[str, nn.Module]],
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any] | None = None,
    *,
    gradients: bool = False,
    curvature: str = "probes",
    probes: int = 2,
    seed: int = 0,
    gradient_batches: int | None = None,
    progress: ProgressLike = None,
) -> dict[str, LayerStats]:
    """Input (and optionally output-gradient) statistics for every target layer, in one pass.

    Each batch runs forward once: its inputs are recorded, and on the first ``gradient_batches``
    batches the backward passes of the objective (:func:`output_objectives`) record the Gram of
    the gradients at each target's output (no weight gradients are computed).

    Parameters
    ----------
    model : nn.Module
        Run in eval mode; its training flag, ``requires_grad`` flags and gradients are restored.
    targets : list of (name, module)
    batches : iterable
        Calibration batches.
    forward : callable, optional
        ``forward(module, batch) -> result``.
    gradients : bool
        Also collect the Gram of output gradients.
    curvature : {"probes", "labels", "sampled"}
        The objective whose gradients are recorded.
    probes : int
        Random output directions (or sampled tokens) per batch.
    seed : int
        Seed of the probes.
    gradient_batches : int, optional
        Use only the first this many batches for the gradient statistics (None: all).
    progress : bool or callable, optional
        Progress over the batches (see :mod:`svdkit.progress`).

    Returns
    -------
    dict of name -> LayerStats

    Raises
    ------
    NonFiniteCalibration
        A batch gave NaN or infinite inputs, gradients or outputs (naming the batch and layer).
    ValueError
        No batch, a target never reached, or a model output that depends on no target.
    """
    was_training = model.training
    params = list(model.parameters())
    saved = [(p.grad, p.requires_grad) for p in params]
    generator = torch.Generator().manual_seed(seed)
    n_batches = 0
    model.eval()
    try:
        for p in params:  # only the gradients at the targets' outputs are needed
            p.requires_grad_(False)
        with InputRecorder(targets) as inputs, GradientRecorder(targets, make_leaves=True) as grads, \
                BatchRunner(model, forward, what="calibration batch") as run:
            for index, batch in enumerate(track(batches, progress, desc="calibration batches")):
                inputs.next_batch(index)
                grads.next_batch(index)
                n_batches += 1
                with_gradients = gradients and (gradient_batches is None or index < gradient_batches)
                with torch.set_grad_enabled(with_gradients):
                    result = run(batch)
                if not with_gradients:
                    continue
                for objective in output_objectives(result, batch, curvature, probes, generator):
                    if not objective.requires_grad:
                        raise ValueError("the model output does not depend on any target layer's output")
                    if not bool(torch.isfinite(objective.detach()).all()):
                        raise NonFiniteCalibration(f"calibration batch {index}: the model's output is NaN or infinite")
                    objective.backward(retain_graph=True)
                del result
    finally:
        for p, (grad, requires) in zip(params, saved):
            p.grad = grad
            p.requires_grad_(requires)
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("the calibration data held no batches")
    inputs.check_reached()
    return {name: LayerStats(inputs.stats[name], grads.stats.get(name)) for name, _ in targets}
