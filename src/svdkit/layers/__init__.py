"""Neural-network modules built on the SVD: factorized low-rank layers and LoRA wrappers."""

from .lowrank import (
    LowRankConv2d,
    LowRankEmbedding,
    LowRankLayer,
    LowRankLinear,
    grouped_matrices,
    low_rank_class,
    low_rank_from_spec,
    low_rank_types,
    register_low_rank,
)
from .lora import LoRAConv1D, LoRAConv2d, LoRALayer, LoRALinear, is_lora_layer, lora_wrapper_class, wrap_lora

__all__ = [
    "LoRAConv1D",
    "LoRAConv2d",
    "LoRALayer",
    "LoRALinear",
    "LowRankConv2d",
    "LowRankEmbedding",
    "LowRankLayer",
    "LowRankLinear",
    "grouped_matrices",
    "is_lora_layer",
    "low_rank_class",
    "low_rank_from_spec",
    "low_rank_types",
    "lora_wrapper_class",
    "register_low_rank",
    "wrap_lora",
]
