"""The transformers side of a saved model: its companions (config, generation config, tokenizer)
and the skeleton that its ``config.json`` describes, built without memory for its parameters."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import nn

from ..checkpoint import empty_parameters
from ..export.remote_code import base_config

__all__ = ["is_transformers_model", "transformers_skeleton", "write_companions"]


def write_companions(model: nn.Module, directory: Path, tokenizer: Any = None, *, dtype: str | None = None) -> None:
    """What a transformers model needs beside its weights to load and generate on its own: its
    config (and generation config), and the tokenizer when one is given. ``dtype`` (a name such
    as ``"bfloat16"``) is the saved weights' dtype, recorded in the config."""
    if is_transformers_model(model):
        config = _saved_config(model)
        if dtype is not None:
            config.dtype = dtype
        config.save_pretrained(str(directory))
        generation = getattr(model, "generation_config", None)
        if generation is not None and hasattr(generation, "save_pretrained"):
            generation.save_pretrained(str(directory))
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(directory))


def is_transformers_model(model: nn.Module) -> bool:
    """A transformers ``PreTrainedModel`` (checked by duck typing, without importing transformers)."""
    config = getattr(model, "config", None)
    return hasattr(model, "base_model_prefix") and hasattr(config, "save_pretrained") and hasattr(config, "to_json_string")


def _saved_config(model: nn.Module) -> Any:
    """The transformers config to save: naming the model's class (as ``save_pretrained`` does),
    without a GGUF quantization entry (the weights were dequantized when loaded)."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    quantization = getattr(config, "quantization_config", None)
    method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(quantization, "quant_method", None)
    if quantization is not None and str(getattr(method, "value", method)) == "gguf":  # str() of the enum is its name
        delattr(config, "quantization_config")
    return config


def transformers_skeleton(directory: Path) -> nn.Module:
    """The transformers model that ``directory``'s ``config.json`` describes, its parameters on
    the ``meta`` device (see :func:`empty_parameters`), tied as the config says, in eval mode.

    The config of a model exported for plain transformers (:mod:`svdkit.export.remote_code`) is
    read back as its base model's, without running the directory's modeling code.
    """
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(f"{directory} holds a transformers model: pip install 'svdkit[hf]'") from exc
    config = base_config(directory) or transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        cls = transformers.AutoModelForCausalLM if any(a.endswith("ForCausalLM") for a in architectures) else transformers.AutoModel
        with empty_parameters():
            model = cls.from_config(config)
    else:
        with empty_parameters():
            model = cls(config)
    tie = getattr(model, "tie_weights", None)
    if callable(tie):  # tied weights are saved once: the skeleton must know which they are
        tie()
    generation = directory / "generation_config.json"
    if generation.exists() and hasattr(model, "generation_config"):
        model.generation_config = transformers.GenerationConfig.from_pretrained(str(directory))
    return model.eval()
