"""A module's weight seen as a matrix, and written back.

One registry maps each supported module type to a :class:`WeightView`, which knows how to read
the module's weight as a 2-D matrix and how to write such a matrix back. Analysis, compression
and LoRA all go through it, so they agree on what "the matrix of a layer" is:

==============================  ==========================================================
``nn.Linear``                   ``weight``, (out_features, in_features)
transformers ``Conv1D``         ``weight.T`` (its weight is stored in x out)
``nn.Conv2d``                   ``weight.reshape(out, in / groups * kh * kw)``
``nn.Embedding``                ``weight``, (num_embeddings, embedding_dim)
==============================  ==========================================================

For Linear, Conv1D and Conv2d the matrix maps a layer's (flattened) input to its output, so
``y = W x + b``. Conv2d with ``groups > 1`` is a block-diagonal operator; its view stacks the
per-group blocks, and :attr:`WeightView.groups` says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

__all__ = [
    "WeightView",
    "get_view",
    "is_conv1d",
    "register_view",
    "set_weight_matrix",
    "supported_types",
    "weight_matrix",
]


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2 style: weight stored in x out), without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


@dataclass(frozen=True)
class WeightView:
    """How one kind of module exposes its weight as a matrix.

    Attributes
    ----------
    kind : str
        ``"linear"``, ``"conv1d"``, ``"conv2d"`` or ``"embedding"``.
    read : callable
        ``module -> Tensor of shape (rows, cols)``; a view of the weight where possible.
    write : callable
        ``(module, Tensor of shape (rows, cols)) -> None``; copies into the weight in place,
        keeping its dtype and device.
    """

    kind: str
    read: Callable[[nn.Module], torch.Tensor]
    write: Callable[[nn.Module, torch.Tensor], None]

    def groups(self, module: nn.Module) -> int:
        """Number of convolution groups (1 for everything but grouped Conv2d)."""
        return int(getattr(module, "groups", 1)) if self.kind == "conv2d" else 1


def _copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.reshape(param.shape).to(param.dtype))


_VIEWS: list[tuple[Callable[[nn.Module], bool], WeightView]] = []


def register_view(matches: Callable[[nn.Module], bool], view: WeightView) -> None:
    """Add a view; later registrations take precedence over earlier ones."""
    _VIEWS.insert(0, (matches, view))


register_view(
    lambda m: isinstance(m, nn.Embedding),
    WeightView("embedding", lambda m: m.weight, lambda m, W: _copy_into(m.weight, W)),
)
register_view(
    lambda m: isinstance(m, nn.Conv2d),
    WeightView(
        "conv2d",
        lambda m: m.weight.reshape(m.weight.shape[0], -1),
        lambda m, W: _copy_into(m.weight, W),
    ),
)
register_view(
    is_conv1d,
    WeightView("conv1d", lambda m: m.weight.T, lambda m, W: _copy_into(m.weight, W.T)),
)
register_view(
    lambda m: isinstance(m, nn.Linear),
    WeightView("linear", lambda m: m.weight, lambda m, W: _copy_into(m.weight, W)),
)


def get_view(module: nn.Module) -> WeightView | None:
    """The view for ``module``, or None if its type is not supported."""
    for matches, view in _VIEWS:
        if matches(module):
            return view
    return None


def supported_types() -> list[str]:
    """Kinds of module that have a view."""
    return [view.kind for _, view in _VIEWS]


def _require_view(module: nn.Module) -> WeightView:
    view = get_view(module)
    if view is None:
        raise TypeError(f"{type(module).__name__} has no weight view; supported: {', '.join(supported_types())}")
    return view


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The module's weight as a matrix (see the table in this module's docstring).

    Returns
    -------
    Tensor of shape (rows, cols)
        A view sharing storage with the weight where the layout allows it.
    """
    return _require_view(module).read(module)


def set_weight_matrix(module: nn.Module, W: torch.Tensor) -> None:
    """Write a matrix of the view's shape back into the module's weight, in place.

    Raises
    ------
    ValueError
        If ``W`` does not have the shape of :func:`weight_matrix` for this module.
    """
    view = _require_view(module)
    expected = tuple(view.read(module).shape)
    if tuple(W.shape) != expected:
        raise ValueError(f"{type(module).__name__} expects a {expected} matrix, got {tuple(W.shape)}")
    view.write(module, W)
