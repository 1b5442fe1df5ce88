"""transformers' own ``save_pretrained`` refused on a model that holds svdkit's low-rank layers.

A compressed transformers model keeps its class (``LlamaForCausalLM`` ...), so its inherited
``save_pretrained`` writes a checkpoint whose ``config.json`` names the dense class and whose
weights are factors that class does not have: plain transformers loads such a directory with
random weights in place of every factorized layer and no error. :func:`guard_plain_save` gives the
model (the instance, not its class) a ``save_pretrained`` that refuses, naming what to call instead:
:func:`svdkit.save_compressed` writes the modeling code and ``auto_map`` that
``from_pretrained(dir, trust_remote_code=True)`` needs. A model loaded that way has its own
modeling classes and saves normally.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..layers.lowrank import low_rank_types

__all__ = ["PlainSaveRefused", "guard_plain_save"]


class PlainSaveRefused:
    """A ``save_pretrained`` that raises, naming :func:`svdkit.save_compressed` (picklable, so that
    ``torch.save`` and ``copy.deepcopy`` of the model keep working)."""

    def __init__(self, class_name: str, layers: int) -> None:
        self.class_name, self.layers = class_name, layers

    def __call__(self, save_directory: Any = "DIR", *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            f"this {self.class_name} holds {self.layers} svdkit low-rank layers: transformers' save_pretrained would write "
            f"a checkpoint that plain transformers loads as a dense {self.class_name} with random weights in their place. "
            f"Save it with svdkit.save_compressed(model, {str(save_directory)!r}), which writes the modeling code that "
            "from_pretrained(dir, trust_remote_code=True) needs, or svdkit.decompress(model) first for a dense checkpoint"
        )


def guard_plain_save(model: nn.Module) -> None:
    """Refuse transformers' ``save_pretrained`` on ``model`` when it holds low-rank layers (see
    the module docstring); models without ``save_pretrained`` or low-rank layers are left alone."""
    if not callable(getattr(type(model), "save_pretrained", None)):
        return
    layers = sum(isinstance(m, low_rank_types()) for m in model.modules())
    if layers:
        model.save_pretrained = PlainSaveRefused(type(model).__name__, layers)
    elif isinstance(model.__dict__.get("save_pretrained"), PlainSaveRefused):
        del model.save_pretrained  # decompressed: transformers' own again
