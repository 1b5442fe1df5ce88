"""LoRA through the SVD: adapters, SVD initialisations, extraction from fine-tunes, PEFT interop.

>>> from svdkit.lora import add_lora, export_peft
>>> lora_model = add_lora(model, ["query", "value"], r=16, init_lora_weights="pissa")  # doctest: +SKIP
>>> export_peft(lora_model, "adapter/", base_model_name_or_path="bert-base")  # doctest: +SKIP

See ``docs/lora.md`` for the tour.
"""

from ..layers.lora import LoRAConv1D, LoRAConv2d, LoRALayer, LoRALinear, wrap_lora
from .config import LoRAConfig
from .delta import analyze_deltas, delta_spectrum, weight_deltas
from .extract import extract_lora
from .inits import (
    InitContext,
    LoRAInit,
    available_inits,
    get_init,
    init_spectrum,
    register_init,
    top_triplets,
    unregister_init,
)
from .model import add_lora, apply_lora, select_lora_targets
from .peft_io import export_peft, find_root, import_peft, peft_factors
from .report import DeltaReport, DeltaSpectrum, ExtractionReport, LayerExtraction
from .state import (
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    mark_only_lora_trainable,
    merge_and_unload,
    merge_lora,
    unmerge_lora,
)

__all__ = [
    "DeltaReport",
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
    "get_init",
    "import_peft",
    "init_spectrum",
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
    "unregister_init",
    "weight_deltas",
    "wrap_lora",
]
