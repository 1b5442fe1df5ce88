"""A model as a stack of blocks, run one block at a time on cached inputs.

Decoder LLMs (and most transformers) are an embedding, a list of identical blocks and a head.
The block-by-block pipeline (:mod:`svdkit.compression.sequential`) never runs the whole model:
it runs the model once up to the first block to cache that block's inputs, then runs each
block on the cached inputs of the block before (llm-compressor's sequential onloading, SVD-LLM's
low-resource mode). This module finds the blocks and runs them:

- :func:`find_blocks`: the ``nn.ModuleList`` of identical blocks that holds the target layers;
- :func:`capture_block_inputs`: the first block's positional input and keyword arguments
  (attention mask, rotary position embeddings, ...) for each calibration batch, caught by a
  hook that stops the forward there;
- :func:`run_block`: one block on one cached input;
- :func:`head_loss_gradient`: the gradient of the model's loss at the last block's output,
  found by running the model with its blocks swapped for a stand-in that returns the cached
  output (so the head is run by the model's own forward, whatever it is);
- :class:`BlockHome`: where the blocks' weights stay between visits (in memory, or in a
  checkpoint read one block at a time).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from ..batches import BatchRunner, current_token_mask, output_tensor, run_batch, token_mask
from ..checkpoint import materialize, release

__all__ = ["BlockHome", "BlockInput", "BlockStack", "capture_block_inputs", "find_blocks", "head_loss_gradient", "run_block"]

# Keyword arguments a block gets from the model that must not survive into a replay: a KV
# cache would grow with every call, and returning attention weights wastes memory.
_DROPPED = ("past_key_values", "past_key_value", "cache", "layer_past")
_FORCED = {"use_cache": False, "output_attentions": False}


@dataclass
class BlockStack:
    """The blocks of a model.

    Attributes
    ----------
    name : str
        Dotted name of the ``nn.ModuleList`` (e.g. ``"model.layers"``).
    blocks : nn.ModuleList
    """

    name: str
    blocks: nn.ModuleList

    def block_name(self, index: int) -> str:
        return f"{self.name}.{index}" if self.name else str(index)

    def index_of(self, layer_name: str) -> int | None:
        """The index of the block that holds ``layer_name``, or None."""
        prefix = f"{self.name}." if self.name else ""
        if not layer_name.startswith(prefix):
            return None
        head = layer_name[len(prefix):].split(".", 1)[0]
        return int(head) if head.isdigit() and int(head) < len(self.blocks) else None


def find_blocks(model: nn.Module, target_names: Iterable[str]) -> BlockStack | None:
    """The longest ``nn.ModuleList`` of blocks of one class that holds every target layer.

    One block is a stack too (a one-layer decoder, or one block of a large model measured alone).
    Returns None when there is no such list (then the model is compressed as a whole).
    """
    names = list(target_names)
    best: BlockStack | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        stack = BlockStack(name, module)
        if not all(stack.index_of(n) is not None for n in names):
            continue
        if best is None or len(module) > len(best.blocks):
            best = stack
    return best


@dataclass
class BlockInput:
    """What one block receives for one calibration batch.

    Attributes
    ----------
    hidden : Tensor of shape (batch, seq, d)
        The positional input (the residual stream).
    kwargs : dict
        Keyword arguments (masks, position embeddings), shared by every block.
    mask : Tensor of shape (batch, seq) or None
        The token mask of the batch (padding left out of the statistics).
    index : int
        The batch's index in the whole calibration list (errors name it).
    """

    hidden: torch.Tensor
    kwargs: dict[str, Any] = field(default_factory=dict)
    mask: torch.Tensor | None = None
    index: int = 0


class _Caught(Exception):
    """Stops the forward at the first block."""


def _to(value: Any, device: torch.device | str | None) -> Any:
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def capture_block_inputs(
    model: nn.Module,
    stack: BlockStack,
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any] | None = None,
    *,
    device: torch.device | str | None = None,
    first: int = 0,
    step: int = 1,
) -> list[BlockInput]:
    """The first block's inputs for every batch (the model runs only up to that block).

    Parameters
    ----------
    model : nn.Module
    stack : BlockStack
    batches : iterable
        Calibration batches, as :func:`svdkit.batches.run_batch` takes them.
    forward : callable, optional
        ``forward(module, batch)`` runs the model on a batch.
    device : optional
        Where to keep the cached inputs (default: where they were computed).
    first, step : int
        Batch ``i`` is batch ``first + i * step`` of the whole calibration list (this process's
        share of it, with several processes), as errors name it.

    Returns
    -------
    list of BlockInput
    """
    caught: list[BlockInput] = []

    def catch(module, args, kwargs):
        hidden, kwargs = _by_keyword(module, args, kwargs)
        kept = {k: v for k, v in kwargs.items() if k not in _DROPPED}
        kept.update({k: v for k, v in _FORCED.items() if k in kwargs})
        index = first + len(caught) * step
        caught.append(BlockInput(_to(hidden.detach(), device), _to(kept, device), _to(current_token_mask(), device), index))
        raise _Caught

    handle = stack.blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad(), BatchRunner(model, forward, what="calibration batch", first=first, step=step) as run:
            for index, batch in enumerate(batches):
                try:
                    run(batch)
                except _Caught:
                    continue
                raise ValueError(f"calibration batch {first + index * step} never reached the first block ({stack.block_name(0)})")
    finally:
        handle.remove()
    if not caught:
        raise ValueError("the calibration data held no batches")
    return caught


def _by_keyword(block: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """A block's call as (hidden state, keyword arguments): positional inputs after the hidden
    state (GPT-2's past, mask, encoder states) are named by the block's signature, so every call
    can be replayed by keyword."""
    if not args:
        if "hidden_states" not in kwargs:
            raise TypeError(f"{type(block).__name__} was called without a positional input or hidden_states=")
        kwargs = dict(kwargs)
        return kwargs.pop("hidden_states"), kwargs
    if len(args) == 1:
        return args[0], kwargs
    parameters = [p for p in inspect.signature(block.forward).parameters.values()
                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    if len(parameters) < len(args) or parameters[0].kind is inspect.Parameter.POSITIONAL_ONLY:
        raise TypeError(f"{type(block).__name__} takes positional inputs svdkit cannot name; it replays blocks by keyword")
    named = {p.name: value for p, value in zip(parameters[1:], args[1:])}
    return args[0], {**named, **kwargs}


# Whether a block class returns a tuple (hidden state first, as Falcon's and older transformers'
# blocks do) or the hidden state itself: a stand-in for the blocks must answer in the same form.
_RETURNS_TUPLE: dict[type, bool] = {}


def run_block(block: nn.Module, item: BlockInput, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Run ``block`` on a cached input (or on ``hidden`` with the cached keyword arguments)."""
    device = _block_device(block)
    x = item.hidden if hidden is None else hidden
    with token_mask(item.mask):
        result = block(_to(x, device), **_to(item.kwargs, device))
    _RETURNS_TUPLE[type(block)] = isinstance(result, (tuple, list))
    return output_tensor(result)


def _block_device(block: nn.Module) -> torch.device | None:
    for p in block.parameters():
        return p.device
    return None


class _Replay(nn.Module):
    """Stands in for the blocks: returns a given hidden state, whatever it is fed (in a tuple when
    the blocks it stands for return one)."""

    def __init__(self, as_tuple: bool) -> None:
        super().__init__()
        self.hidden: torch.Tensor | None = None
        self.as_tuple = as_tuple

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor, None]:
        if self.hidden is None:
            raise RuntimeError("the stand-in for the blocks was run before it was given a hidden state")
        return (self.hidden, None) if self.as_tuple else self.hidden


@contextlib.contextmanager
def _blocks_replaced(model: nn.Module, stack: BlockStack) -> Iterator[_Replay]:
    replay = _Replay(_RETURNS_TUPLE.get(type(stack.blocks[0]), False))
    parent_name, _, child = stack.name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    original = getattr(parent, child)
    setattr(parent, child, nn.ModuleList([replay]))
    try:
        yield replay
    finally:
        setattr(parent, child, original)


def head_loss_gradient(
    model: nn.Module,
    stack: BlockStack,
    batch: Any,
    last_hidden: torch.Tensor,
    objective: Callable[[Any, Any], Iterator[torch.Tensor]],
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> torch.Tensor:
    """The gradient of the model's objective with respect to the last block's output.

    Parameters
    ----------
    model : nn.Module
    stack : BlockStack
    batch : object
        The calibration batch ``last_hidden`` was computed from.
    last_hidden : Tensor of shape (batch, seq, d)
        The last block's output on ``batch``.
    objective : callable
        ``objective(result, batch)`` yields scalars to differentiate (their gradients are summed).
    forward : callable, optional

    Returns
    -------
    Tensor of shape (batch, seq, d)
    """
    rows = []
    # One sequence at a time: the logits of a large vocabulary (and their gradients) are the
    # biggest tensors of the whole pipeline.
    for index in range(last_hidden.shape[0]):
        hidden = last_hidden[index:index + 1].detach().clone().requires_grad_(True)
        total = torch.zeros_like(hidden)
        row = _batch_row(batch, index)
        with _blocks_replaced(model, stack) as replay, torch.enable_grad():
            replay.hidden = hidden
            result = run_batch(model, row, forward)
            for value in objective(result, row):
                (grad,) = torch.autograd.grad(value, hidden, retain_graph=True)
                total += grad
        rows.append(total)
        del result
    return torch.cat(rows)


def _batch_row(batch: Any, index: int) -> Any:
    """Row ``index`` of a batch (a tensor, a dict of tensors, or a tuple whose first item is)."""
    if isinstance(batch, torch.Tensor):
        return batch[index:index + 1]
    if isinstance(batch, dict):
        return {k: v[index:index + 1] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] > index else v for k, v in batch.items()}
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)([batch[0][index:index + 1], *batch[1:]])
    raise TypeError(f"cannot take one sequence of a {type(batch).__name__} batch")


class BlockHome:
    """Where the blocks' weights stay between visits, and how a block visits the compute device.

    In memory (the default): a visit moves the block to ``device`` and back. From a checkpoint
    (the model built on empty parameters, see :func:`svdkit.checkpoint.empty_parameters`):
    a visit reads the block's tensors from the checkpoint onto ``device`` and gives them back
    afterwards, so host memory holds one block at a time.

    Parameters
    ----------
    device : optional
        The compute device (None: where the weights are).
    checkpoint : svdkit.checkpoint.Checkpoint, optional
        The weights of a model whose blocks hold empty (meta) parameters.
    """

    def __init__(self, device: torch.device | str | None = None, checkpoint: Any = None) -> None:
        self.device = None if device is None else torch.device(device)
        self.checkpoint = checkpoint

    @contextlib.contextmanager
    def visit(self, stack: BlockStack, index: int) -> Iterator[nn.Module]:
        block = stack.blocks[index]
        if self.checkpoint is not None:
            materialize(block, self.checkpoint, f"{stack.block_name(index)}.", device=self.device)
            try:
                yield block
            finally:
                release(block)
            return
        home = next((p.device for p in block.parameters()), None)
        moved = self.device is not None and home is not None and self.device != home
        if moved:
            block.to(self.device)
        try:
            yield block
        finally:
            if moved:
                block.to(home)
