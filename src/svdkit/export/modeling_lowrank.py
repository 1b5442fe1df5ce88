"""Low-rank layers for a transformers model compressed by svdkit, loadable without svdkit.

svdkit copies this file into every transformers model it saves, as ``modeling_svdkit.py``,
followed by a few lines that subclass the model's own transformers classes (its config, its
model with a head, its base model). ``config.json`` names those classes in ``auto_map``, so

    AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)

builds the original architecture and, before its weights are read, leaves out the modules the saved
model was built without (``svdkit.absent_modules``, e.g. a BERT without its pooler), unfolds every mixture-of-experts
module listed under ``svdkit.expert_banks`` into an :class:`ExpertBank` (one module per expert) and
puts a :class:`LowRankLinear` at every layer listed under ``svdkit.low_rank`` (name -> rank). Everything
else (generation with a KV cache, ``save_pretrained``, tied embeddings, each family's quirks) is
the base class's own; ``save_pretrained`` also writes svdkit's description of the directory
(``svdkit_compressed.json``), so that svdkit loads a re-saved model as one it saved itself. Only
torch and transformers' public API are used here: the file must not import svdkit.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn

__all__ = [
    "ExpertBank", "ExpertMLP", "LowRankLinear", "LowRankModelMixin", "base_class", "drop_absent_modules", "drop_modules",
    "low_rank_targets", "sha256", "swap_expert_banks", "swap_low_rank_layers", "write_description",
]

CONFIG_KEY = "svdkit"
DESCRIPTION_NAME = "svdkit_compressed.json"  # svdkit.compression.saved.CONFIG_NAME
DESCRIPTION_VERSION = 3  # svdkit.compression.saved.FORMAT_VERSION


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


def _default_gate(expert: nn.Module, out: torch.Tensor) -> torch.Tensor:
    gate, up = out.chunk(2, dim=-1)
    return expert.act_fn(gate) * up


class ExpertMLP(nn.Module):
    """One expert of an :class:`ExpertBank`: ``down_proj(gate(gate_up_proj(x)))`` with the fused
    module's gating (its ``_apply_gate``, by default ``act_fn(first half) * second half``)."""

    def __init__(self, hidden: int, intermediate: int, fused: nn.Module, *, device=None, dtype=None) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False, device=device, dtype=dtype)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, device=device, dtype=dtype)
        self.act_fn = fused.act_fn
        for key, value in vars(fused).items():  # what a custom gating reads besides act_fn
            if not key.startswith("_") and isinstance(value, (bool, int, float)):
                setattr(self, key, value)
        self._apply_gate = getattr(type(fused), "_apply_gate", _default_gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self._apply_gate(self, self.gate_up_proj(x)))


class ExpertBank(nn.ModuleList):
    """A fused experts module (``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I)) as one
    :class:`ExpertMLP` per expert, called as the fused module is:
    ``bank(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H)``."""

    def __init__(self, fused: nn.Module) -> None:
        experts, two_i, hidden = fused.gate_up_proj.shape
        factory = {"device": fused.gate_up_proj.device, "dtype": fused.gate_up_proj.dtype}
        super().__init__(ExpertMLP(hidden, two_i // 2, fused, **factory) for _ in range(experts))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            hit = torch.unique(top_k_index[(top_k_index >= 0) & (top_k_index < len(self))])
        for e in hit.tolist():
            token_idx, position = torch.where(top_k_index == e)
            result = self[e](hidden_states[token_idx])
            out.index_add_(0, token_idx, (result * top_k_weights[token_idx, position, None]).to(out.dtype))
        return out


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


def _saved_names_keeping(model: nn.Module, config: Any, names: Any) -> list[str | None]:
    """``names`` (of the model that was saved) as names of ``model``: a base model loaded from a
    saved model with a head (``AutoModel``) drops the head's prefix; a layer of the head, which
    the base model does not have, becomes None."""
    saved_prefix = (getattr(config, CONFIG_KEY, None) or {}).get("base_model_prefix") or ""
    if not saved_prefix or getattr(model, "base_model", model) is not model:
        return list(names)
    return [name[len(saved_prefix) + 1:] if name.startswith(saved_prefix + ".") else None for name in names]


def _saved_names(model: nn.Module, config: Any, names: Any) -> list[str]:
    return [name for name in _saved_names_keeping(model, config, names) if name is not None]


def drop_modules(model: nn.Module, names: Any) -> None:
    """Set to None every module of ``model`` named in ``names`` (modules the saved model was built
    without: ``BertModel(config, add_pooling_layer=False)`` has no pooler).

    Raises
    ------
    ValueError
        A named module the model does not have.
    """
    for name in names:
        owner_name, _, attr = name.rpartition(".")
        try:
            owner = model.get_submodule(owner_name) if owner_name else model
        except AttributeError:
            owner = None
        if owner is None or not isinstance(getattr(owner, attr, None), nn.Module):
            raise ValueError(f"{name!r} is listed as a module the saved model has not, but {type(model).__name__} has no such module")
        setattr(owner, attr, None)


def drop_absent_modules(model: nn.Module, config: Any) -> None:
    """:func:`drop_modules` for the modules ``config`` lists under ``svdkit.absent_modules``."""
    settings = getattr(config, CONFIG_KEY, None) or {}
    drop_modules(model, _saved_names(model, config, settings.get("absent_modules") or []))


def swap_expert_banks(model: nn.Module, config: Any) -> None:
    """Unfold every fused experts module that ``config`` lists (``svdkit.expert_banks``) into an
    empty :class:`ExpertBank` of its geometry (the weights are read afterwards).

    Raises
    ------
    ValueError
        A listed module the model does not have, or one that holds no fused experts.
    """
    settings = getattr(config, CONFIG_KEY, None) or {}
    for name in _saved_names(model, config, settings.get("expert_banks") or []):
        try:
            fused = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"config.json lists {name!r} as a mixture's experts, but {type(model).__name__} has no such module") from None
        if isinstance(fused, ExpertBank):
            continue
        if not (isinstance(getattr(fused, "gate_up_proj", None), torch.Tensor) and fused.gate_up_proj.ndim == 3):
            raise ValueError(f"config.json lists {name!r} as a mixture's experts, but it is a {type(fused).__name__} without 3-D gate_up_proj")
        owner_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner_name) if owner_name else model, attr, ExpertBank(fused))


def low_rank_targets(model: nn.Module, config: Any) -> dict[str, int]:
    """The layers of ``model`` that ``config`` makes low-rank: module name -> rank (the names of
    the saved model, less the head's prefix and layers for a base model, see :func:`_saved_names`)."""
    low_rank = (getattr(config, CONFIG_KEY, None) or {}).get("low_rank") or {}
    saved = list(low_rank)
    return {name: int(low_rank[old]) for old, name in zip(saved, _saved_names_keeping(model, config, saved)) if name is not None}


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


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (svdkit's writers use this one too)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_description(model: nn.Module, directory: Path) -> bool:
    """Write svdkit's description (``svdkit_compressed.json``) of the safetensors weights that
    ``save_pretrained`` just wrote into ``directory``: the low-rank layers and expert banks with
    their geometry, the modules left out, and every weight file's SHA-256.

    Only for what svdkit rebuilds from ``config.json``: the model class the export was written
    from (not its base model alone), with unquantized weights in safetensors files. Returns
    whether it was written.
    """
    settings = getattr(model.config, CONFIG_KEY, None) or {}
    architectures = settings.get("base_architectures") or []
    files = sorted(path.name for path in directory.glob("*.safetensors"))
    if (not files or not architectures or type(model).__name__ != "Svdkit" + architectures[0]
            or getattr(model.config, "quantization_config", None) is not None):
        return False
    layers: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if isinstance(module, ExpertBank):
            expert = module[0]
            layers[name] = {"type": "ExpertBank", "experts": len(module), "hidden": expert.down_proj.out_features,
                            "intermediate": expert.down_proj.in_features}
        elif isinstance(module, LowRankLinear):
            layers[name] = {"type": "LowRankLinear", "rank": module.rank, "in_features": module.in_features,
                            "out_features": module.out_features, "bias": module.bias is not None}
    description = {
        "format_version": DESCRIPTION_VERSION,
        "svdkit_version": settings.get("svdkit_version"),
        "saved_by": f"save_pretrained of {type(model).__name__} (transformers {transformers.__version__})",
        "source": None,
        "dtype": str(model.dtype).removeprefix("torch."),
        "layers": layers,
        "absent_modules": list(settings.get("absent_modules") or []) or None,
        "quantization": None,
        "files": {name: sha256(directory / name) for name in files},
    }
    (directory / DESCRIPTION_NAME).write_text(json.dumps(description, indent=2), encoding="utf-8")
    return True


class LowRankModelMixin:
    """Put before a transformers model class: the modules the saved model lacks are left out, its
    mixtures' experts listed in the config are unfolded and its listed layers become low-rank
    before ``post_init`` (which gathers the model's tied weights and initializes what no
    checkpoint fills)."""

    def post_init(self) -> None:
        drop_absent_modules(self, self.config)
        swap_expert_banks(self, self.config)
        swap_low_rank_layers(self, self.config)
        super().post_init()

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``save_pretrained``, then svdkit's description of the directory (see
        :func:`write_description`; not for a push to the hub, another process, a variant, or
        weights saved without safetensors)."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        main_process = args[0] if args else kwargs.get("is_main_process", True)
        if (main_process and kwargs.get("safe_serialization", True) and not kwargs.get("variant")
                and not kwargs.get("push_to_hub")):
            write_description(self, Path(save_directory))
        return result


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
