"""Layer kinds: how a module's weight reads as a matrix, how its inputs become rows, and the
classes that factorize it or wrap it with LoRA — one registry record per kind.

Analysis, compression, calibration and LoRA all go through the record of a layer's kind, so
they agree on what "the matrix of a layer" is and on the vectors it is applied to:

==============================  ==================================  ================================
kind                            matrix                              input rows (calibration)
==============================  ==================================  ================================
``linear``  (``nn.Linear``)     ``weight``, (out, in)               the last axis; leading axes are
                                                                    samples (padding tokens left out)
``conv1d`` (transformers        ``weight.T`` (stored in x out)      as ``linear``
``Conv1D``, GPT-2 style)
``conv2d``  (``nn.Conv2d``)     ``weight.reshape(out, in/g*kh*kw)``  each unfolded patch
``embedding`` (``nn.Embedding``) ``weight``, (num_embeddings, dim)   none: its input is a token id
==============================  ==================================  ================================

For the vector kinds the matrix maps a layer's (flattened) input to its output, ``y = W x + b``.
Conv2d with ``groups > 1`` is a block-diagonal operator; its matrix stacks the per-group blocks
and :meth:`WeightView.groups` says how many.

The low-rank class (:func:`svdkit.layers.lowrank.register_low_rank`) and the LoRA wrapper
(:func:`svdkit.layers.lora.register_lora_wrapper`) of a kind are filled into its record when they
register, so adding a layer kind is one :func:`register_view` call plus those two classes, and
every list of kinds elsewhere is derived from this registry (:func:`kinds`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "WeightView",
    "get_view",
    "is_conv1d",
    "kinds",
    "patch_rows",
    "register_view",
    "set_weight_matrix",
    "token_rows",
    "unregister_view",
    "view_of_kind",
    "weight_matrix",
]


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2 style: weight stored in x out), without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def token_rows(module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of a tensor whose last axis is the feature axis: shape (N, d).

    Parameters
    ----------
    module : nn.Module
        The layer (unused: the rows do not depend on it).
    x : Tensor of shape (..., d)
    mask : Tensor of shape (batch, seq), optional
        Tokens to keep when ``x`` is (batch, seq, d) (padding is left out).
    """
    if mask is not None and x.ndim == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
        return x[mask.to(x.device).bool()]
    return x.reshape(-1, x.shape[-1])


def patch_rows(module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The patches a Conv2d applies its matrix to: shape (N, C_in * kh * kw).

    Pads as the convolution does (every padding mode, ``"same"``/``"valid"``), then unfolds
    with its kernel, stride and dilation; ``mask`` does not apply to images.
    """
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    patches = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=0, stride=module.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def _channel_rows(module: nn.Module, g: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of a (B, C, H, W) tensor: one per pixel, shape (N, C)."""
    return g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])


@dataclass
class WeightView:
    """The registry record of one layer kind.

    Attributes
    ----------
    kind : str
        The kind's name (``"linear"``, ``"conv1d"``, ``"conv2d"``, ``"embedding"``, or a registered one).
    read : callable
        ``module -> Tensor of shape (rows, cols)``; a view of the weight where possible.
    write : callable
        ``(module, Tensor of shape (rows, cols)) -> None``; copies into the weight in place,
        keeping its dtype and device.
    input_rows : callable or None
        ``(module, x, mask) -> Tensor of shape (N, cols)``: the vectors the matrix is applied to
        in an input ``x`` (:func:`token_rows`, :func:`patch_rows`); None for a layer whose input is
        not a vector (an embedding's token ids), which is never calibrated.
    output_rows : callable or None
        ``(module, y, mask) -> Tensor of shape (N, rows)``: the output vectors (where output
        gradients are recorded); defaults to ``input_rows``.
    input_axis : int
        The axis of the input that holds the ``cols`` features (checked before recording).
    input_width : callable or None
        ``module -> int``, the size of that axis (default: the matrix's ``cols``).
    grouped : bool
        The layer is a grouped operator (``module.groups`` blocks on its diagonal).
    low_rank : type or None
        Its factorized class (set by :func:`svdkit.layers.lowrank.register_low_rank`).
    lora_wrapper : type or None
        Its LoRA wrapper (set by :func:`svdkit.layers.lora.register_lora_wrapper`).
    """

    kind: str
    read: Callable[[nn.Module], torch.Tensor]
    write: Callable[[nn.Module, torch.Tensor], None]
    input_rows: Callable[..., torch.Tensor] | None = token_rows
    output_rows: Callable[..., torch.Tensor] | None = None
    input_axis: int = -1
    input_width: Callable[[nn.Module], int] | None = None
    grouped: bool = False
    low_rank: type | None = None
    lora_wrapper: type | None = None

    @property
    def calibrated(self) -> bool:
        """Whether the layer is applied to input vectors (so calibration statistics describe it)."""
        return self.input_rows is not None

    def groups(self, module: nn.Module) -> int:
        """Number of blocks on the diagonal (1 for everything but a grouped operator)."""
        return int(getattr(module, "groups", 1)) if self.grouped else 1

    def rows_of_output(self, module: nn.Module, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The output vectors of ``y``, shape (N, rows)."""
        rows = self.output_rows or self.input_rows
        if rows is None:
            raise TypeError(f"layers of kind {self.kind!r} have no output vectors to record")
        return rows(module, y, mask)

    def width(self, module: nn.Module) -> int:
        """The size of the input axis :attr:`input_axis`."""
        return int(self.input_width(module)) if self.input_width is not None else int(self.read(module).shape[1])


def _copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.reshape(param.shape).to(param.dtype))


_VIEWS: list[tuple[Callable[[nn.Module], bool], WeightView]] = []


def register_view(matches: Callable[[nn.Module], bool], view: WeightView) -> WeightView:
    """Add a layer kind; later registrations take precedence over earlier ones.

    Parameters
    ----------
    matches : callable
        ``module -> bool``: whether a module is of this kind.
    view : WeightView
        Its record (a kind name used by no other record).

    Returns
    -------
    WeightView
        ``view`` (its ``low_rank`` and ``lora_wrapper`` are filled when those classes register).

    Raises
    ------
    ValueError
        For a kind name that is already registered.
    """
    if any(existing.kind == view.kind for _, existing in _VIEWS):
        raise ValueError(f"a layer kind named {view.kind!r} is already registered")
    _VIEWS.insert(0, (matches, view))
    return view


def unregister_view(kind: str) -> None:
    """Remove a registered kind (for tests and plugins that register kinds temporarily)."""
    _VIEWS[:] = [(m, v) for m, v in _VIEWS if v.kind != kind]


register_view(
    lambda m: isinstance(m, nn.Embedding),
    WeightView("embedding", lambda m: m.weight, lambda m, W: _copy_into(m.weight, W), input_rows=None),
)
register_view(
    lambda m: isinstance(m, nn.Conv2d),
    WeightView(
        "conv2d",
        lambda m: m.weight.reshape(m.weight.shape[0], -1),
        lambda m, W: _copy_into(m.weight, W),
        input_rows=patch_rows, output_rows=_channel_rows, input_axis=-3, input_width=lambda m: m.in_channels, grouped=True,
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
    """The record of ``module``'s kind, or None if its type is not supported."""
    for matches, view in _VIEWS:
        if matches(module):
            return view
    return None


def view_of_kind(kind: str) -> WeightView:
    """The record of a kind by name.

    Raises
    ------
    KeyError
        For a kind that is not registered (the message lists the known ones).
    """
    for _, view in _VIEWS:
        if view.kind == kind:
            return view
    raise KeyError(f"no layer kind named {kind!r}; registered: {', '.join(kinds())}")


def kinds(where: Callable[[WeightView], Any] | None = None) -> tuple[str, ...]:
    """The registered kind names, oldest first, optionally those whose record satisfies ``where``
    (e.g. ``kinds(lambda v: v.lora_wrapper)``: the kinds LoRA can wrap)."""
    return tuple(view.kind for _, view in reversed(_VIEWS) if where is None or where(view))


def _require_view(module: nn.Module) -> WeightView:
    view = get_view(module)
    if view is None:
        raise TypeError(f"{type(module).__name__} has no weight view; supported kinds: {', '.join(kinds())}")
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
