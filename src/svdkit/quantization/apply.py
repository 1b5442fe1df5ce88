"""Quantize a (compressed) model's weights: both factors of every low-rank Linear and every
remaining ``nn.Linear``, with a torchao weight-only mode (:mod:`svdkit.quantization.modes`).

Every weight it could take is either quantized or listed in the report with the reason it was
kept in floating point: a Linear whose weight is tied to another module's (a language model's
output head tied to its input embedding: quantizing it would untie them and add the head's
bytes), a weight whose sizes the kernel cannot take (``misaligned="keep"``; the default refuses
them, naming each and what to do), or a layer kind torchao's weight-only kernels do not take
(``Conv1D``, convolutions, embeddings). torchao's own ``quantize_`` skips a misaligned int4
weight with only a log line; here nothing is skipped silently.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..exports import json_text
from ..layers.lowrank import LowRankLayer, LowRankLinear
from ..views import get_view
from .modes import MODES, QuantMode, alignment, check_platform, required_rank_multiple
from .storage import is_quantized, tensor_bytes

__all__ = ["QuantizationReport", "QuantizedWeight", "check_alignment", "quantize_weights", "weight_bytes"]


def weight_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers, each tensor once (tied weights once; a
    quantized weight by its inner tensors)."""
    seen: set[int] = set()
    total = 0
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor_bytes(tensor)
    return total


@dataclass
class QuantizedWeight:
    """One weight the quantization looked at.

    Attributes
    ----------
    name : str
        The parameter (``...q_proj.u``, ``...down_proj.weight``).
    shape : tuple of int
    bytes_before, bytes_after : int
    quantized : bool
    reason : str
        Why it was kept in floating point (empty when quantized).
    """

    name: str
    shape: tuple[int, ...]
    bytes_before: int
    bytes_after: int
    quantized: bool
    reason: str = ""


@dataclass
class QuantizationReport:
    """What :func:`quantize_weights` did.

    Attributes
    ----------
    mode : str
    group_size : int or None
    weights : list of QuantizedWeight
    model_bytes_before, model_bytes_after : int
        :func:`weight_bytes` of the whole model.
    """

    mode: str
    group_size: int | None
    weights: list[QuantizedWeight] = field(default_factory=list)
    model_bytes_before: int = 0
    model_bytes_after: int = 0

    @property
    def kept(self) -> list[QuantizedWeight]:
        return [w for w in self.weights if not w.quantized]

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "group_size": self.group_size, "model_bytes_before": self.model_bytes_before,
                "model_bytes_after": self.model_bytes_after, "quantized": sum(w.quantized for w in self.weights),
                "kept": len(self.kept), "weights": [dict(asdict(w), shape=list(w.shape)) for w in self.weights]}

    def to_json(self, path=None, *, indent: int = 2) -> str:
        return json_text(self.to_dict(), path, indent=indent)

    def to_table(self) -> str:
        done = sum(w.quantized for w in self.weights)
        lines = [f"{self.mode} weight-only{f' (groups of {self.group_size})' if self.group_size else ''}: {done} weights quantized, "
                 f"{len(self.kept)} kept in floating point; model {self.model_bytes_before / 2**20:.2f} MiB -> "
                 f"{self.model_bytes_after / 2**20:.2f} MiB"]
        lines += [f"  kept {w.name} {'x'.join(map(str, w.shape))}: {w.reason}" for w in self.kept]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_table()


@dataclass
class _Weight:
    """One weight tensor and every (module, attribute) that holds it."""

    name: str
    holders: list[tuple[nn.Module, str]]
    reason: str = ""

    @property
    def tensor(self) -> torch.Tensor:
        module, attr = self.holders[0]
        return getattr(module, attr)


def _weights(model: nn.Module) -> list[_Weight]:
    """Every weight a mode could take, once however many modules hold it, with the reason it is
    kept in floating point ("" when it can be quantized)."""
    holders: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for attr, p in module.named_parameters(recurse=False):
            entry = (name, module, attr)
            if all(m is not module or a != attr for _, m, a in holders.get(id(p), [])):
                holders.setdefault(id(p), []).append(entry)
    out = []
    for entries in holders.values():
        name, module, attr = entries[0]
        key = f"{name}.{attr}" if name else attr
        quantizable = [(m, a) for _, m, a in entries
                       if (isinstance(m, LowRankLinear) and a in ("u", "v")) or (isinstance(m, nn.Linear) and a == "weight")]
        if not quantizable:
            if get_view(module) is not None and attr == "weight" or isinstance(module, LowRankLayer):
                out.append(_Weight(key, [(module, attr)], f"a {type(module).__name__}: torchao's weight-only kernels take nn.Linear weights"))
            continue
        name, _, attr = next((n, m, a) for n, m, a in entries if (m, a) in quantizable)
        key = f"{name}.{attr}" if name else attr
        others = [f"{n}.{a}" if n else a for n, m, a in entries if (m, a) not in quantizable]
        reason = f"shared with {others[0]}, which is no Linear: quantizing it would untie them and add its bytes" if others else ""
        out.append(_Weight(key, [(m, a) for _, m, a in entries], reason))
    return out


def _is_factor(weight: _Weight) -> bool:
    module, attr = weight.holders[0]
    return isinstance(module, LowRankLinear) and attr in ("u", "v")


def _misaligned(shape: tuple[int, ...], mode: QuantMode, group_size: int | None) -> str:
    inputs, outputs = alignment(mode, group_size)
    out_size, in_size = shape
    problems = []
    if in_size % inputs:
        problems.append(f"input size {in_size} is not a multiple of the group size {inputs}")
    if out_size % outputs:
        problems.append(f"output size {out_size} is not a multiple of {outputs}")
    return " and ".join(problems)


def _quantize_one(weight: nn.Parameter, mode: QuantMode, group_size: int | None) -> torch.Tensor:
    """``weight`` (out, in) quantized through torchao's module API, on a Linear that holds it."""
    from torchao.quantization import quantize_

    holder = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    holder.weight = nn.Parameter(weight.detach(), requires_grad=False)
    quantize_(holder, mode.make_config(group_size), filter_fn=lambda module, _: module is holder)
    if type(holder.weight).__name__ != mode.tensor_class:  # torchao skipped it (it logs, and nothing else)
        raise RuntimeError(f"torchao left a weight of shape {tuple(weight.shape)} unquantized in mode {mode.name!r}")
    return holder.weight


def check_alignment(model: nn.Module, mode: str, *, group_size: int | None = None) -> None:
    """Refuse a model whose weights ``mode`` cannot all take: every weight
    :func:`quantize_weights` would quantize must have an input size that is a multiple of the
    group size and an output size that is a multiple of what the kernel's packing needs.

    Raises
    ------
    ValueError
        An unknown mode or group size, or misaligned weights: each named (up to five), with the
        fix (for a low-rank factor, whose input or output size is its rank: the rank multiple).
    """
    multiple = required_rank_multiple(mode, group_size)  # checks the mode and the group size
    record = MODES[mode]
    size = record.group_size(group_size)
    bad, by_rank = [], False
    for weight in _weights(model):
        if weight.reason or is_quantized(weight.tensor):
            continue
        problem = _misaligned(tuple(weight.tensor.shape), record, size)
        if problem:
            bad.append(f"{weight.name} {tuple(weight.tensor.shape)}: {problem}")
            by_rank |= _is_factor(weight)
    if bad:
        hint = (f"a low-rank factor's input (u) or output (v) size is its rank: compress with CompressConfig(rank_multiple={multiple}) "
                "(svdkit compress --rank-multiple), " if by_rank else "")
        raise ValueError(
            f"{len(bad)} weight(s) do not fit {mode} weight-only quantization{f' with groups of {size}' if size else ''}: "
            + "; ".join(bad[:5]) + ("; ..." if len(bad) > 5 else "")
            + f". Fix: {hint}choose another group_size, or pass misaligned='keep' to keep them in floating point"
        )


def quantize_weights(
    model: nn.Module,
    mode: str = "int8",
    *,
    group_size: int | None = None,
    misaligned: Literal["error", "keep"] = "error",
    inplace: bool = False,
) -> tuple[nn.Module, QuantizationReport]:
    """Quantize a model's Linear weights and low-rank factors, weight-only.

    Parameters
    ----------
    model : nn.Module
        A model (compressed by :func:`svdkit.compress` or not) in a floating-point dtype; the
        activations keep that dtype.
    mode : {"int8", "int4"}
        ``"int8"``: one scale per output row (torchao ``Int8WeightOnlyConfig``); ``"int4"``:
        groups of ``group_size`` inputs (torchao's CPU int4, ``PrototypeInt4WeightOnlyConfig``).
    group_size : int, optional
        int4's group (32, 64 or 128; default 32). A factor ``u``'s input size is the rank: int4
        needs ranks that are multiples of :func:`~svdkit.quantization.required_rank_multiple`
        (compress with ``CompressConfig(rank_multiple=...)``).
    misaligned : {"error", "keep"}
        A weight whose sizes the kernel cannot take: refuse (default), or keep it in floating
        point and list it in the report.
    inplace : bool
        Quantize ``model`` itself instead of a deep copy.

    Returns
    -------
    model : nn.Module
    report : QuantizationReport

    Raises
    ------
    ValueError
        An unknown mode, a group size the mode does not take, weights that are not floating
        point, a mode with no kernel on the model's device here (named), or misaligned weights
        with ``misaligned="error"`` (each named, with the rank multiple that fixes them).
    ImportError
        Without torchao.
    """
    if misaligned not in ("error", "keep"):
        raise ValueError(f"misaligned: expected 'error' or 'keep', got {misaligned!r}")
    floating = [p for p in model.parameters() if not is_quantized(p)]
    if not floating:
        raise ValueError("the model has no floating-point parameters to quantize (is it quantized already?)")
    dtype, device = floating[0].dtype, floating[0].device
    record = check_platform(mode, device, dtype, group_size)
    size = record.group_size(group_size)
    for weight in _weights(model):
        tensor = weight.tensor
        if weight.reason:
            continue
        if is_quantized(tensor):
            raise ValueError(f"{weight.name} is quantized already")
        if not tensor.is_floating_point():
            raise ValueError(f"{weight.name} is {tensor.dtype}, not a floating-point weight")
    if misaligned == "error":
        check_alignment(model, mode, group_size=size)
    out = model if inplace else copy.deepcopy(model)
    report = QuantizationReport(mode, size, model_bytes_before=weight_bytes(out))
    for weight in _weights(out):
        tensor = weight.tensor
        before = tensor_bytes(tensor)
        reason = weight.reason or _misaligned(tuple(tensor.shape), record, size)
        if reason:
            report.weights.append(QuantizedWeight(weight.name, tuple(tensor.shape), before, before, False, reason))
            continue
        with torch.no_grad():
            quantized = _quantize_one(tensor, record, size)
        for module, attr in weight.holders:
            setattr(module, attr, quantized)
        report.weights.append(QuantizedWeight(weight.name, tuple(tensor.shape), before, tensor_bytes(quantized), True))
    report.model_bytes_after = weight_bytes(out)
    return out, report
