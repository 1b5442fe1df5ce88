"""A mixture-of-experts layer's experts as one module per expert, the layout svdkit compresses.

transformers (5.x) stores a layer's experts fused, as 3-D parameters of one ``...Experts`` module
(Mixtral, Qwen2/3-MoE, OLMoE, ...: ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I), called
with the tokens, the top-k expert indices and their routing weights). :class:`ExpertBank` holds the
same experts as an ``nn.ModuleList`` of :class:`ExpertMLP` (``gate_up_proj``: ``nn.Linear(H, 2I)``,
``down_proj``: ``nn.Linear(I, H)``) and computes exactly what the fused module computes, so every
expert matrix is an ordinary Linear: targets, rank specs, calibration (each expert sees the tokens
routed to it), low-rank factors, the analysis and LoRA need nothing else. Expert ``e``'s
projections are named ``<experts>.<e>.gate_up_proj`` and ``<experts>.<e>.down_proj``, as in the
older one-Linear-per-expert layout.

A bank built from a fused module shares its storage (no copy); :meth:`ExpertBank.to_dense`
fuses the experts back. While a bank runs, :func:`svdkit.calibrate.row_weights` carries each
routed token's routing weight, so recorders can weigh the tokens as the layer's output does.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from ..batches import row_weights
from .lowrank.base import LowRankLayer, spec_field, spec_mismatch, register_spec_class

__all__ = [
    "ExpertBank",
    "ExpertLayout",
    "ExpertMLP",
    "expert_containers",
    "expert_group",
    "fused_layout_problem",
    "is_fused_experts",
    "router_names",
]


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers fused experts module (3-D ``gate_up_proj`` or ``down_proj``)."""
    params = getattr(module, "_parameters", {})
    return any(isinstance(params.get(name), torch.Tensor) and params[name].ndim == 3 for name in ("gate_up_proj", "down_proj", "up_proj"))


def fused_layout_problem(module: nn.Module) -> str | None:
    """Why a fused experts module is not in the layout svdkit compresses (None: it is).

    The layout: ``gate_up_proj`` (E, 2I, H) with the gate half first and ``down_proj`` (E, H, I),
    no biases, not transposed, no norm after each expert (transformers' default
    ``@use_experts_implementation``, used by Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek and most others).
    """
    flags = {"has_gate": True, "is_concatenated": True, "is_transposed": False, "has_bias": False, "has_post_expert_norm": False}
    odd = [f"{name}={getattr(module, name)!r}" for name, want in flags.items() if getattr(module, name, want) != want]
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor) or gate_up.ndim != 3 or down.ndim != 3:
        odd.append("no 3-D gate_up_proj and down_proj")
    elif not (gate_up.shape[0] == down.shape[0] and gate_up.shape[2] == down.shape[1] and gate_up.shape[1] == 2 * down.shape[2]):
        odd.append(f"gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} do not chain as (E, 2I, H), (E, H, I)")
    if any(name.endswith("_bias") and p is not None for name, p in module._parameters.items()):
        odd.append("biases")
    if not odd:
        return None
    return (f"{type(module).__name__} stores its experts as {', '.join(odd)}; svdkit compresses experts stored as gate_up_proj "
            "(E, 2I, H) and down_proj (E, H, I) without biases (transformers' default layout) or as one nn.Linear per expert")


class ExpertMLP(nn.Module):
    """One expert: ``down_proj(gate(gate_up_proj(x)))`` with the fused module's gating
    (transformers' ``_apply_gate``; by default ``act_fn(first half) * second half``).

    Attributes
    ----------
    gate_up_proj : nn.Linear, weight (2I, H)
    down_proj : nn.Linear, weight (H, I)
    act_fn : nn.Module
    """

    def __init__(self, hidden: int, intermediate: int, fused: nn.Module, *, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False, **factory)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, **factory)
        self.act_fn = fused.act_fn
        # what a custom gating reads of its module besides act_fn (clamp limits, scales)
        for key, value in vars(fused).items():
            if not key.startswith("_") and isinstance(value, (bool, int, float)):
                setattr(self, key, value)
        self._apply_gate = getattr(type(fused), "_apply_gate", _default_gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self._apply_gate(self, self.gate_up_proj(x)))


def _default_gate(expert: nn.Module, out: torch.Tensor) -> torch.Tensor:
    gate, up = out.chunk(2, dim=-1)
    return expert.act_fn(gate) * up


@register_spec_class
class ExpertBank(LowRankLayer, nn.ModuleList):
    """The experts of one MoE layer, one :class:`ExpertMLP` each (see the module docstring).

    Called as transformers' fused experts module: ``bank(hidden_states (T, H), top_k_index (T, k),
    top_k_weights (T, k)) -> (T, H)``.

    Attributes
    ----------
    fused : nn.Module
        A twin of the fused module it stands for, with empty (``meta``) parameters: what
        :meth:`to_dense` fills to give the fused module back.
    """

    accepts = "a transformers fused experts module (gate_up_proj, down_proj)"

    def __init__(self, fused: nn.Module, experts: list[ExpertMLP]) -> None:
        nn.ModuleList.__init__(self, experts)
        object.__setattr__(self, "fused", _empty_twin(fused))  # not a child: it holds no weights
        self.num_experts = len(experts)

    @classmethod
    def _check_dense(cls, dense: nn.Module) -> None:
        problem = fused_layout_problem(dense)
        if problem is not None:
            raise TypeError(problem)

    @classmethod
    def from_fused(cls, fused: nn.Module) -> "ExpertBank":
        """A bank whose expert weights are views of ``fused``'s parameters (no copy).

        Raises
        ------
        TypeError
            For a layout svdkit does not compress (the message says which).
        """
        cls._check_dense(fused)
        bank = cls._empty(fused)
        with torch.no_grad():
            for e, expert in enumerate(bank):
                expert.gate_up_proj.weight = nn.Parameter(fused.gate_up_proj[e], requires_grad=fused.gate_up_proj.requires_grad)
                expert.down_proj.weight = nn.Parameter(fused.down_proj[e], requires_grad=fused.down_proj.requires_grad)
        return bank

    @classmethod
    def _empty(cls, fused: nn.Module) -> "ExpertBank":
        experts, two_i, hidden = fused.gate_up_proj.shape
        members = [ExpertMLP(hidden, two_i // 2, fused, device="meta", dtype=fused.gate_up_proj.dtype) for _ in range(experts)]
        return cls(fused, members)

    @property
    def hidden_size(self) -> int:
        return self.fused.gate_up_proj.shape[2]

    @property
    def intermediate_size(self) -> int:
        return self.fused.down_proj.shape[2]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            hit = torch.unique(top_k_index[(top_k_index >= 0) & (top_k_index < self.num_experts)])
        for e in hit.tolist():
            token_idx, position = torch.where(top_k_index == e)
            weights = top_k_weights[token_idx, position, None]
            with row_weights(weights[:, 0]):
                result = self[e](hidden_states[token_idx])
            out.index_add_(0, token_idx, (result * weights).to(out.dtype))
        return out

    def materialize_from(self, read: Any) -> None:
        """Give empty experts their weights from a checkpoint of the fused module:
        ``read(key) -> Tensor`` reads ``gate_up_proj`` and ``down_proj`` (each once)."""
        for key in ("gate_up_proj", "down_proj"):
            fused = read(key)
            expected = (self.num_experts, *getattr(self[0], key).weight.shape)
            if tuple(fused.shape) != expected:
                raise ValueError(f"the checkpoint's {key} has shape {tuple(fused.shape)}, the model's config makes it {expected}")
            for e, expert in enumerate(self):
                getattr(expert, key).weight = nn.Parameter(fused[e], requires_grad=False)

    def spec(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "experts": self.num_experts, "hidden": self.hidden_size,
                "intermediate": self.intermediate_size}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], dense: nn.Module, *, name: str = "") -> "ExpertBank":
        saved = tuple(spec_field(spec, key, int, name) for key in ("experts", "hidden", "intermediate"))
        base = (dense.gate_up_proj.shape[0], dense.gate_up_proj.shape[2], dense.down_proj.shape[2])
        if saved != base:
            raise spec_mismatch(name, spec, f"experts, hidden, intermediate = {saved}", f"{base}", dense)
        bank = cls._empty(dense)
        for expert in bank:
            expert.to_empty(device=dense.gate_up_proj.device if not dense.gate_up_proj.is_meta else "meta")
        return bank

    def to_dense(self) -> nn.Module:
        """The fused module again (a new one), its experts' dense weights stacked in its parameters."""
        fused = _empty_twin(self.fused)
        for key in ("gate_up_proj", "down_proj"):
            parts = [_dense_weight(getattr(expert, key)) for expert in self]
            fused._parameters[key] = nn.Parameter(torch.stack(parts), requires_grad=False)
        return fused

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}"


def _dense_weight(layer: nn.Module) -> torch.Tensor:
    """A dense or factorized Linear's (out, in) weight, detached."""
    return (layer.dense_weight() if hasattr(layer, "dense_weight") else layer.weight).detach()


def _empty_twin(fused: nn.Module) -> nn.Module:
    """A shallow copy of ``fused`` whose parameters are empty (``meta``) tensors of the same shapes."""
    twin = copy.copy(fused)
    twin._parameters = {k: None if v is None else nn.Parameter(v.detach().to("meta"), requires_grad=False)
                        for k, v in fused._parameters.items()}
    twin._buffers = dict(fused._buffers)
    twin._modules = dict(fused._modules)
    return twin


@dataclass(frozen=True)
class ExpertLayout:
    """One MoE layer's experts.

    Attributes
    ----------
    name : str
        The experts container (``model.layers.0.mlp.experts``).
    num_experts : int
    layout : {"fused", "modules"}
        3-D parameters of one module, or one module per expert.
    problem : str or None
        Why a fused module cannot be unfolded (an unknown layout), else None.
    """

    name: str
    num_experts: int
    layout: str
    problem: str | None = None


def expert_containers(model: nn.Module) -> list[ExpertLayout]:
    """Every experts container of ``model``, in module order."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, ExpertBank):
            found.append(ExpertLayout(name, len(module), "modules"))
        elif is_fused_experts(module):
            experts = next(p.shape[0] for p in module._parameters.values() if p is not None and p.ndim == 3)
            found.append(ExpertLayout(name, int(experts), "fused", fused_layout_problem(module)))
        elif isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] == "experts" and len(module) > 1:
            found.append(ExpertLayout(name, len(module), "modules"))
    return found


def router_names(model: nn.Module) -> set[str]:
    """The routers of every MoE block: its Linear children with one output per expert (the
    router) or one output (a shared expert's gate)."""
    routers = set()
    for layout in expert_containers(model):
        parent_name = layout.name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Linear) and child.out_features in (layout.num_experts, 1):
                routers.add(f"{parent_name}.{child_name}" if parent_name else child_name)
    return routers


_EXPERT = re.compile(r"^(?P<container>.+)\.(?P<index>\d+)\.(?P<projection>.+)$")


def expert_group(name: str, containers: set[str]) -> tuple[str, str, int] | None:
    """For a layer inside an expert: (its container, its name within the expert, the expert's
    index); None for a layer that is no expert's. Layers of one container with one name within
    their experts (every expert's ``down_proj``) are siblings."""
    match = _EXPERT.match(name)
    if match is None or match["container"] not in containers:
        return None
    return match["container"], match["projection"], int(match["index"])
