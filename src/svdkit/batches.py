"""Running batches through a model: the one forward contract, what a result stands for, the
token masks and routing weights a batch carries to the hooks, and errors that name the batch.

- :func:`run_batch` feeds one batch (a tensor, a dict of tensors, or what a ``forward`` takes);
- :func:`output_tensor` finds the tensor a forward result stands for;
- :func:`token_mask` / :func:`row_weights` tell hooks which tokens count and how much (padding
  left out; a mixture's routing weights);
- :class:`BatchRunner` names the batch and the layer that failed; :class:`NonFiniteData` is the
  one error for NaN or infinite values that data produced.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from typing import Any, Callable, Iterator

import torch
from torch import nn

__all__ = [
    "BatchRunner",
    "NonFiniteData",
    "current_row_weights",
    "current_token_mask",
    "output_tensor",
    "row_weights",
    "run_batch",
    "token_mask",
]

_TOKEN_MASK: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("svdkit_token_mask", default=None)
_ROW_WEIGHTS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("svdkit_row_weights", default=None)


@contextlib.contextmanager
def token_mask(mask: torch.Tensor | None) -> Iterator[None]:
    """Within this context, hooks keep only the tokens where ``mask`` (batch, seq) is nonzero."""
    handle = _TOKEN_MASK.set(mask)
    try:
        yield
    finally:
        _TOKEN_MASK.reset(handle)


@contextlib.contextmanager
def row_weights(weights: torch.Tensor | None) -> Iterator[None]:
    """Within this context, a layer's input rows carry these weights, shape (N,): a mixture of
    experts' routing weights for the tokens routed to one expert (its output is scaled by them).
    Recorders that are asked to weigh rows (:class:`InputRecorder` ``weighted=True``) add
    ``w**2 x x^T``: the Gram of the rows as they reach the layer's output."""
    handle = _ROW_WEIGHTS.set(weights)
    try:
        yield
    finally:
        _ROW_WEIGHTS.reset(handle)


def current_token_mask() -> torch.Tensor | None:
    """The mask set by the innermost :func:`token_mask`, or None."""
    return _TOKEN_MASK.get()


def current_row_weights() -> torch.Tensor | None:
    """The weights set by the innermost :func:`row_weights`, or None."""
    return _ROW_WEIGHTS.get()


def output_tensor(result: Any) -> torch.Tensor:
    """The tensor a forward result stands for: a sentence embedding, logits, the last hidden
    state, a block's hidden state (a tensor, or the first tensor of a tuple), or the first
    floating-point tensor found.

    Raises
    ------
    TypeError
        When the result holds no tensor.
    """
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


def run_batch(model: nn.Module, batch: Any, forward: Callable[[nn.Module, Any], Any] | None = None) -> Any:
    """Run one calibration batch: ``forward(model, batch)`` if given, else the model on it.

    A dict batch is passed as keyword arguments (transformers style) with its
    ``attention_mask`` applied to the hooks; a tensor is passed as is; a tuple or list whose
    first item is a tensor (a ``DataLoader`` of (inputs, targets)) passes that first item.
    """
    if forward is not None:
        return forward(model, batch)
    if isinstance(batch, dict):
        with token_mask(batch.get("attention_mask")):
            return model(**batch)
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return model(batch[0])
    raise TypeError(
        f"cannot feed a calibration batch of type {type(batch).__name__} to the model; "
        "pass tensors, dicts of tensors, or a forward= function (lists of strings need a model "
        "loaded with svdkit.models.load_model, whose forward tokenizes them)"
    )


class NonFiniteData(ValueError):
    """Data produced NaN or infinite values (a calibration batch, or a batch analysed): the
    message names the batch and the first layer they reached."""


_USER_ERRORS = (RuntimeError, TypeError, ValueError, IndexError, KeyError, AttributeError)


class BatchRunner:
    """Context manager: forward pre-hooks on the leaf modules remember which one ran last, so an
    error raised while a batch runs becomes a ``ValueError`` naming the batch index and that layer.

    Parameters
    ----------
    module : nn.Module
    forward : callable, optional
        ``forward(module, batch) -> output``; default :func:`svdkit.batches.run_batch`.
    what : str
        How batches are called in messages (``"batch"``, ``"calibration batch"``).
    first, step : int
        The index of the first batch and the step between batches (this process's share of a
        calibration list), as messages name them.
    """

    def __init__(self, module: nn.Module, forward: Callable[[nn.Module, Any], Any] | None = None, *, what: str = "batch",
                 first: int = 0, step: int = 1) -> None:
        self.module, self.what = module, what
        self._forward = forward
        self._handles: list = []
        self._counter = itertools.count(first, step)
        self.current: str | None = None
        self.index: int | None = None

    def __enter__(self) -> "BatchRunner":
        for name, mod in self.module.named_modules():
            if name and next(iter(mod.children()), None) is None:
                self._handles.append(mod.register_forward_pre_hook(self._entered(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _entered(self, name: str):
        def hook(module, inputs):
            self.current = name
        return hook

    def __call__(self, batch: Any) -> Any:
        """Run the next batch (counting from 0); see the class docstring."""
        self.index = next(self._counter)
        self.current = None
        try:
            return run_batch(self.module, batch, self._forward)
        except NonFiniteData:
            raise  # already names the batch and the layer
        except _USER_ERRORS as exc:
            where = ""
            if self.current is not None:
                layer = self.module.get_submodule(self.current)
                where = f" in layer {self.current} ({type(layer).__name__})"
            raise ValueError(f"{self.what} {self.index}{where}: {type(exc).__name__}: {exc}") from exc
