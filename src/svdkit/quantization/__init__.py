"""Low rank and weight quantization together: a compressed model's factors and remaining Linear
layers quantized with torchao's weight-only modes (int8; int4 where this platform has a kernel),
saved and loaded through svdkit (and plain transformers where torchao's format allows)."""

from .apply import QuantizationReport, QuantizedWeight, check_alignment, quantize_weights, weight_bytes
from .modes import MODES, QuantMode, alignment, check_platform, register_mode, required_rank_multiple
from .storage import QUANTIZED_CLASSES, flatten_state, is_quantized, tensor_bytes, unflatten_state

__all__ = [
    "MODES",
    "QUANTIZED_CLASSES",
    "QuantMode",
    "QuantizationReport",
    "QuantizedWeight",
    "alignment",
    "check_alignment",
    "check_platform",
    "flatten_state",
    "is_quantized",
    "quantize_weights",
    "register_mode",
    "required_rank_multiple",
    "tensor_bytes",
    "unflatten_state",
    "weight_bytes",
]
