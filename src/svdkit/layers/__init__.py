"""Neural-network modules built on the SVD: factorized low-rank layers and LoRA wrappers."""

from .lowrank import LowRankConv2d, LowRankEmbedding, LowRankLinear, balanced_factors, grouped_matrices
from .lora import LoRAConv1D, LoRAConv2d, LoRALayer, LoRALinear, is_lora_layer, lora_wrapper_class, wrap_lora

__all__ = [
    "LowRankConv2d",
    "LowRankEmbedding",
    "LowRankLinear",
    "balanced_factors",
    "grouped_matrices",
    "LoRAConv1D",
    "LoRAConv2d",
    "LoRALayer",
    "LoRALinear",
    "is_lora_layer",
    "lora_wrapper_class",
    "wrap_lora",
]
