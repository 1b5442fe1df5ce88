"""Whether a model is a causal language model: the one test that loading and compression share.

A causal LM is a model with a language-modelling head that predicts the next token: it
calibrates on token streams and is judged by perplexity. transformers lists its causal-LM
classes in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` (what ``AutoModelForCausalLM`` builds), and not
all of them end in ``ForCausalLM``: GPT-2's is ``GPT2LMHeadModel``, CTRL's ``CTRLLMHeadModel``.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn

__all__ = ["cache_keyword", "causal_lm_class_names", "is_causal_lm"]


@functools.lru_cache(maxsize=1)
def causal_lm_class_names() -> frozenset[str]:
    """The class names of transformers' causal LMs (empty without transformers)."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        return frozenset()
    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update((value,) if isinstance(value, str) else value)
    return frozenset(names)


def _is_causal_name(name: str) -> bool:
    return name.endswith("ForCausalLM") or name in causal_lm_class_names()


def is_causal_lm(model_or_config: Any) -> bool:
    """Whether ``model_or_config`` is (or describes) a causal language model.

    Parameters
    ----------
    model_or_config : nn.Module or transformers config
        A module is judged by its class (a subclass of a causal-LM class counts; a bare
        ``LlamaModel`` loaded from a causal checkpoint does not, it has no head); a config by
        its ``architectures``.

    Returns
    -------
    bool
    """
    if isinstance(model_or_config, nn.Module):
        return any(_is_causal_name(cls.__name__) for cls in type(model_or_config).__mro__)
    architectures = getattr(model_or_config, "architectures", None) or ()
    return any(_is_causal_name(str(name)) for name in architectures)


def cache_keyword(model: nn.Module) -> str:
    """The name of a causal LM's key/value cache, as its forward takes it and its output holds it:
    ``"cache"`` from transformers 5 on, ``"past_key_values"`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
