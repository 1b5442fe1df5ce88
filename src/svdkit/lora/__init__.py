"""LoRA through the SVD: adapters, SVD initialisations, extraction from fine-tunes, PEFT interop.

>>> from svdkit.lora import add_lora, export_peft
>>> lora_model = add_lora(model, ["query", "value"], rank=16, init="pissa")  # doctest: +SKIP
>>> export_peft(lora_model, "adapter/", base_model_name_or_path="bert-base")  # doctest: +SKIP

See ``docs/lora.md`` for the tour.
"""

from ..layers.lora import LoRAConv1D, LoRAConv2d, LoRALayer, LoRALinear, wrap_lora
from .config import LoRAConfig
from .delta import DeltaSpectrum, analyze_deltas, delta_spectrum, format_delta_table, weight_deltas
from .extract import ExtractionReport, LayerExtraction, extract_lora
from .inits import InitContext, LoRAInit, available_inits, get_init, register_init, top_triplets
from .model import (
    add_lora,
    apply_lora,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    mark_only_lora_trainable,
    merge_and_unload,
    merge_lora,
    select_lora_targets,
    unmerge_lora,
)
from .peft_io import export_peft, find_root, import_peft, peft_factors

__all__ = [
    "DeltaSpectrum",
    "ExtractionReport",
    "InitContext",
    "LayerExtraction",
    "LoRAConfig",
    "LoRAConv1D",
    "LoRAConv2d",
    "LoRAInit",
    "LoRALayer",
    "LoRALinear",
    "add_lora",
    "analyze_deltas",
    "apply_lora",
    "available_inits",
    "delta_spectrum",
    "export_peft",
    "extract_lora",
    "find_root",
    "format_delta_table",
    "get_init",
    "import_peft",
    "load_lora_state_dict",
    "lora_layers",
    "lora_state_dict",
    "mark_only_lora_trainable",
    "merge_and_unload",
    "merge_lora",
    "peft_factors",
    "register_init",
    "select_lora_targets",
    "top_triplets",
    "unmerge_lora",
    "weight_deltas",
    "wrap_lora",
]
