"""Low-rank layers for a transformers model compressed by svdkit, loadable without svdkit.

svdkit copies this file into every transformers model it saves, as ``modeling_svdkit.py``,
followed by a few lines that subclass the model's own transformers classes (its config, its
model with a head, its base model). ``config.json`` names those classes in ``auto_map``, so

    AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)

builds the original architecture and, before its weights are read, puts a :class:`LowRankLinear`
at every layer that ``config.json`` lists under ``svdkit.low_rank`` (name -> rank). Everything
else (generation with a KV cache, ``save_pretrained``, tied embeddings, each family's quirks) is
the base class's own. Only torch and transformers' public API are used here: the file must not
import svdkit.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn

__all__ = ["LowRankLinear", "LowRankModelMixin", "base_class", "low_rank_targets", "swap_low_rank_layers"]

CONFIG_KEY = "svdkit"


class LowRankLinear(nn.Module):
    """``y = (x V^T) U^T + b``: a rank-``r`` stand-in for ``nn.Linear`` or transformers' ``Conv1D``.

    The parameters have the names and shapes of svdkit's own ``LowRankLinear``, so the saved
    weights load into either.

    Parameters
    ----------
    in_features, out_features, rank : int
    bias : bool
    device, dtype : optional

    Attributes
    ----------
    u : Parameter of shape (out_features, rank)
    v : Parameter of shape (rank, in_features)
    bias : Parameter of shape (out_features,) or None
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *, device=None, dtype=None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.u = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.v = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        if self.u.device.type != "meta":
            nn.init.normal_(self.u, std=rank ** -0.5)
            nn.init.normal_(self.v, std=in_features ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.v), self.u, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


def _dense_geometry(name: str, module: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, has_bias) of an ``nn.Linear`` or a transformers ``Conv1D``
    (whose weight is stored transposed, (in, out))."""
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear):
        out_features, in_features = weight.shape
    elif type(module).__name__ == "Conv1D" and weight is not None and weight.ndim == 2:
        in_features, out_features = weight.shape
    else:
        raise ValueError(
            f"config.json lists {name!r} as a low-rank layer, but this model has a {type(module).__name__} there, "
            "not an nn.Linear or Conv1D: the directory does not match this transformers version's model"
        )
    return int(in_features), int(out_features), getattr(module, "bias", None) is not None


def low_rank_targets(model: nn.Module, config: Any) -> dict[str, int]:
    """The layers of ``model`` that ``config`` makes low-rank: module name -> rank.

    The names in ``config.svdkit["low_rank"]`` are those of the model that was saved; with
    ``base_model_prefix`` non-empty it had a head and its base model sat under that prefix. A
    base model loaded from a saved model with a head (``AutoModel``) drops the prefix, and the
    head's layers.
    """
    settings = getattr(config, CONFIG_KEY, None) or {}
    saved_prefix = settings.get("base_model_prefix") or ""
    is_base = getattr(model, "base_model", model) is model
    targets = {}
    for name, rank in (settings.get("low_rank") or {}).items():
        if saved_prefix and is_base:
            if not name.startswith(saved_prefix + "."):
                continue  # a layer of the head, which the base model does not have
            name = name[len(saved_prefix) + 1:]
        targets[name] = int(rank)
    return targets


def swap_low_rank_layers(model: nn.Module, config: Any) -> None:
    """Replace every layer that ``config`` lists by a :class:`LowRankLinear` of its rank (empty:
    the weights are read afterwards), on the dense layer's device and in its dtype.

    Raises
    ------
    ValueError
        A listed layer that the model does not have, or that is not an ``nn.Linear``/``Conv1D``.
    """
    for name, rank in low_rank_targets(model, config).items():
        try:
            dense = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"config.json lists {name!r} as a low-rank layer, but {type(model).__name__} has no such module: "
                "the directory does not match this transformers version's model"
            ) from None
        if isinstance(dense, LowRankLinear):
            continue
        in_features, out_features, bias = _dense_geometry(name, dense)
        weight = dense.weight
        layer = LowRankLinear(in_features, out_features, rank, bias, device=weight.device, dtype=weight.dtype)
        owner_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner_name) if owner_name else model, attr, layer)


class LowRankModelMixin:
    """Put before a transformers model class: its layers listed in the config become low-rank
    before ``post_init`` (which gathers the model's tied weights and initializes what no
    checkpoint fills)."""

    def post_init(self) -> None:
        swap_low_rank_layers(self, self.config)
        super().post_init()


def base_class(name: str, written_with: str) -> type:
    """transformers' class ``name``; an ImportError that says what to install if it is missing."""
    try:
        cls = getattr(transformers, name)
    except Exception:  # a lazy module raises AttributeError or an import error of its own
        cls = None
    if not isinstance(cls, type):
        raise ImportError(
            f"this model was compressed by svdkit from transformers' {name}, which transformers "
            f"{transformers.__version__} does not have; the directory was written with transformers {written_with}: "
            f"install that version (pip install 'transformers=={written_with}') or another that has {name}"
        )
    return cls
