"""The weight-only quantization modes: one registry record each, and whether this platform has
a kernel for one.

A mode names the torchao config that quantizes one weight matrix, the tensor class it makes,
the devices svdkit runs it on, and the sizes the kernel needs: the input size (a factor ``u``'s
input size is the rank) a multiple of the group size, the output size a multiple of what the
packing needs. torchao itself skips a misaligned weight with only a log line; svdkit checks
first (:func:`alignment`) and never skips silently (:mod:`svdkit.quantization.apply`).

Checked with torchao 0.18 and torch 2.13: ``Int4WeightOnlyConfig`` has no CPU packing any more
(``int4_packing_format="opaque"`` is refused: "Unsupported int4 packing format: opaque"; its
default format needs the ``mslk`` package); the CPU int4 path is ``torchao.prototype.quantization.int4
.PrototypeInt4WeightOnlyConfig`` (``Int4OpaqueTensor`` on ``aten._weight_int4pack_mm_for_cpu``),
whose packing needs the output size to be a multiple of 16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["MODES", "QuantMode", "alignment", "check_platform", "register_mode", "required_rank_multiple", "torchao"]


def torchao():
    """The torchao package, or an ImportError that says how to install it."""
    try:
        import torchao as module
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("weight quantization needs torchao: pip install 'svdkit[quant]' (torchao>=0.18)") from exc
    return module


@dataclass(frozen=True)
class QuantMode:
    """A registered weight-only quantization mode.

    Attributes
    ----------
    name : str
    bits : int
    make_config : callable
        ``make_config(group_size) -> torchao config`` for one ``nn.Linear`` weight.
    tensor_class : str
        The name of the torchao tensor subclass a quantized weight becomes.
    devices : tuple of str
        Device types svdkit runs the mode on (a kernel is checked on first use).
    group_sizes : tuple of int
        Allowed groups along the input (empty: one scale per output row).
    default_group_size : int or None
    out_multiple : int
        The output size the kernel's packing needs a multiple of.
    transformers : str or None
        Why plain transformers cannot load weights of this mode (None: it can, through
        ``TorchAoConfig``).
    """

    name: str
    bits: int
    make_config: Callable[[int | None], Any]
    tensor_class: str
    devices: tuple[str, ...]
    group_sizes: tuple[int, ...] = ()
    default_group_size: int | None = None
    out_multiple: int = 1
    transformers: str | None = None

    def group_size(self, requested: int | None) -> int | None:
        """The group size to use (the default for None).

        Raises
        ------
        ValueError
            A group size the mode does not take.
        """
        if not self.group_sizes:
            if requested is not None:
                raise ValueError(f"quantization mode {self.name!r} keeps one scale per output row: it takes no group_size (got {requested!r})")
            return None
        size = self.default_group_size if requested is None else requested
        if size not in self.group_sizes:
            raise ValueError(f"quantization mode {self.name!r}: group_size must be one of {list(self.group_sizes)}, got {requested!r}")
        return size


def _int8_config(group_size: int | None) -> Any:
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def _int4_cpu_config(group_size: int | None) -> Any:
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

    return PrototypeInt4WeightOnlyConfig(group_size=group_size)


MODES: dict[str, QuantMode] = {}
_KERNELS: dict[tuple[str, str, torch.dtype, int | None], str | None] = {}  # what check_platform found: None or the failure


def register_mode(mode: QuantMode) -> QuantMode:
    """Add a mode to :data:`MODES` (its name must be new)."""
    if mode.name in MODES:
        raise ValueError(f"quantization mode {mode.name!r} is already registered")
    MODES[mode.name] = mode
    return mode


register_mode(QuantMode("int8", 8, _int8_config, "Int8Tensor", ("cpu", "cuda")))
register_mode(QuantMode(
    "int4", 4, _int4_cpu_config, "Int4OpaqueTensor", ("cpu",), group_sizes=(32, 64, 128), default_group_size=32,
    out_multiple=16,
    transformers=("torchao 0.18 cannot write its CPU int4 weights (Int4OpaqueTensor) to safetensors (its safetensors support "
                  "covers Int4Tensor, Int4TilePackedTo4dTensor, Int4PlainInt32Tensor, Int8Tensor and IntxUnpackedToInt8Tensor), "
                  "and transformers' TorchAoConfig cannot quantize a low-rank factor to int4 on load "
                  "(PrototypeInt4WeightOnlyConfig takes module weights only)"),
))


def alignment(mode: QuantMode, group_size: int | None) -> tuple[int, int]:
    """(input multiple, output multiple) a weight of shape (out, in) needs for ``mode``."""
    return (group_size or 1, mode.out_multiple)


def required_rank_multiple(mode: str, group_size: int | None = None) -> int:
    """The rank multiple a compression needs so that both factors of every low-rank layer can be
    quantized in ``mode``: the rank is ``u``'s input size and ``v``'s output size."""
    record = _mode(mode)
    inputs, outputs = alignment(record, record.group_size(group_size))
    return inputs * outputs // math.gcd(inputs, outputs)


def _mode(name: str) -> QuantMode:
    if name not in MODES:
        raise ValueError(f"unknown quantization mode {name!r}; choose one of {sorted(MODES)}")
    return MODES[name]


def check_platform(name: str, device: torch.device | str, dtype: torch.dtype, group_size: int | None = None) -> QuantMode:
    """The mode ``name``, once it is known to run here: on ``device`` in ``dtype``.

    The first call per (device type, dtype, group size) quantizes a small Linear and runs it.

    Raises
    ------
    ValueError
        An unknown mode, a dtype that is not floating point, a bad group size, a device type the
        mode has no kernel for in svdkit, or a kernel that fails here (its error is quoted).
    ImportError
        Without torchao.
    """
    mode = _mode(name)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"quantization mode {name!r} quantizes floating-point weights; the model's weights are {dtype}")
    size = mode.group_size(group_size)
    device = torch.device(device)
    if device.type not in mode.devices:
        raise ValueError(
            f"quantization mode {name!r} has no kernel on {device.type} in svdkit (it runs on {', '.join(mode.devices)}); "
            f"choose another mode ({', '.join(m for m, r in MODES.items() if device.type in r.devices) or 'none'}) or device"
        )
    key = (name, device.type, dtype, size)
    if key not in _KERNELS:
        torchao()
        from torchao.quantization import quantize_

        inputs, outputs = alignment(mode, size)
        probe = nn.Linear(max(64, inputs), max(32, outputs), bias=False, device=device, dtype=dtype)
        try:
            with torch.no_grad():
                quantize_(probe, mode.make_config(size))
                if type(probe.weight).__name__ != mode.tensor_class:
                    raise RuntimeError(f"torchao made a {type(probe.weight).__name__}, not a {mode.tensor_class}")
                probe(torch.randn(2, probe.in_features, device=device, dtype=dtype))
        except Exception as exc:  # noqa: BLE001 - any failure means no usable kernel; its message is quoted
            _KERNELS[key] = f"{type(exc).__name__}: {exc}"
        else:
            _KERNELS[key] = None
    failure = _KERNELS[key]
    if failure is not None:
        raise ValueError(f"quantization mode {name!r} has no working kernel on {device} for {dtype} here ({failure})")
    return mode
