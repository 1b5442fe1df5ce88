"""Run a model on user batches so that a failure names the batch and the layer it happened in."""

from __future__ import annotations

import itertools
from typing import Any, Callable

from torch import nn

from ..calibrate import NonFiniteCalibration, run_batch

__all__ = ["BatchRunner"]

_USER_ERRORS = (RuntimeError, TypeError, ValueError, IndexError, KeyError, AttributeError)


class BatchRunner:
    """Context manager: forward pre-hooks on the leaf modules remember which one ran last, so an
    error raised while a batch runs becomes a ``ValueError`` naming the batch index and that layer.

    Parameters
    ----------
    module : nn.Module
    forward : callable, optional
        ``forward(module, batch) -> output``; default :func:`svdkit.calibrate.run_batch`.
    what : str
        How batches are called in messages (``"batch"``, ``"calibration batch"``).
    passthrough : tuple of exception types
        Raised as they are (they already name the batch and the layer), like
        :class:`~svdkit.calibrate.NonFiniteCalibration`.
    """

    def __init__(self, module: nn.Module, forward: Callable[[nn.Module, Any], Any] | None = None, *, what: str = "batch",
                 passthrough: tuple[type[BaseException], ...] = ()) -> None:
        self.module, self.what = module, what
        self._passthrough = (NonFiniteCalibration, *passthrough)
        self._forward = forward
        self._handles: list = []
        self._counter = itertools.count()
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
        except self._passthrough:
            raise  # already names the batch and the layer
        except _USER_ERRORS as exc:
            where = ""
            if self.current is not None:
                layer = self.module.get_submodule(self.current)
                where = f" in layer {self.current} ({type(layer).__name__})"
            raise ValueError(f"{self.what} {self.index}{where}: {type(exc).__name__}: {exc}") from exc
