"""Add LoRA adapters to a model, and work with a model that has them.

``add_lora`` copies the model by default and returns the copy with adapters; the given model is
left as it was (PiSSA and MiLoRA rewrite base weights, so modifying in place by surprise would
be a trap). Pass ``inplace=True`` to wrap the given model's layers themselves, as PEFT does.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Literal, Mapping

import torch
from torch import nn

from ..calibrate import InputStats, collect_input_stats
from ..layers.lora import LoRALayer, lora_wrapper_class, wrap_lora
from ..surgery import find_targets, replace_module
from ..views import weight_matrix
from .config import LoRAConfig
from .inits import InitContext, get_init

__all__ = [
    "add_lora",
    "apply_lora",
    "load_lora_state_dict",
    "lora_layers",
    "lora_state_dict",
    "mark_only_lora_trainable",
    "merge_and_unload",
    "merge_lora",
    "select_lora_targets",
    "unmerge_lora",
]

_LORA_KINDS = ("linear", "conv1d", "conv2d")
_STATE_KEYS = ("lora_A.weight", "lora_B.weight", "lora_A_init", "lora_B_init")


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALayer]]:
    """The LoRA wrappers inside ``model``, as (dotted name, layer) in model order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALayer)]


def select_lora_targets(
    model: nn.Module, targets: str | Iterable[str] | None = None, exclude: str | Iterable[str] = ()
) -> list[tuple[str, nn.Module]]:
    """Layers that :func:`add_lora` would wrap, as (name, module).

    ``targets`` follows PEFT's ``target_modules`` (see :class:`LoRAConfig`); embeddings are never
    selected, the output head only when named explicitly.

    Raises
    ------
    ValueError
        If the model already has LoRA layers, or nothing matches.
    """
    existing = lora_layers(model)
    if existing:
        raise ValueError(
            f"the model already has {len(existing)} LoRA layer(s) (e.g. {existing[0][0]!r}); "
            "merge_and_unload() it before adding new adapters"
        )
    if targets == "all-linear":
        selected = find_targets(model, None, exclude=_as_spec(exclude), kinds=("linear", "conv1d"))
    else:
        selected = find_targets(model, _as_spec(targets), exclude=_as_spec(exclude), kinds=_LORA_KINDS)
    if not selected:
        raise ValueError(f"no Linear, Conv1D or Conv2d layer of the model matches targets={targets!r} (exclude={exclude!r})")
    return selected


def _as_spec(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    return tuple(value)


def apply_lora(
    model: nn.Module,
    config: LoRAConfig,
    *,
    inplace: bool = False,
    deltas: Mapping[str, torch.Tensor] | None = None,
    input_stats: Mapping[str, InputStats] | None = None,
    calibration: Iterable[Any] | None = None,
    forward: Callable[[Any], Any] | None = None,
) -> nn.Module:
    """Wrap the configured layers of ``model`` in LoRA adapters and initialise them.

    Parameters
    ----------
    model : nn.Module
    config : LoRAConfig
    inplace : bool
        False (default): work on a deep copy and leave ``model`` untouched. True: wrap the
        layers of ``model`` itself (weight-moving inits then rewrite its base weights).
    deltas : dict of name -> Tensor of shape (out, d), optional
        Target weight changes for ``init="svd_delta"`` (in :func:`svdkit.views.weight_matrix`
        orientation). With ``targets=None`` the layers are exactly the keys.
    input_stats : dict of name -> InputStats, optional
        Input statistics for ``init="eva"``, as :func:`svdkit.calibrate.collect_input_stats`
        returns them.
    calibration : iterable of batches, optional
        For ``init="eva"`` without ``input_stats``: batches run through the model (in eval
        mode, without gradients) to collect them.
    forward : callable, optional
        ``forward(batch)`` for the calibration batches (see
        :func:`svdkit.calibrate.collect_input_stats`).

    Returns
    -------
    nn.Module
        The model with adapters: every parameter frozen except the adapters' ``lora_A`` and
        ``lora_B``. Its outputs equal the original model's for every init except
        ``svd_delta`` (up to float32 rounding for ``pissa``/``milora``).

    Raises
    ------
    ValueError
        For a rank above ``min(out, in)`` of a selected layer, missing init data, no matching
        layer, or a model that already has adapters. Nothing is modified when it raises.
    """
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
    init = get_init(config.init)
    targets = config.targets
    if targets is None and deltas is not None and "delta" in init.needs:
        targets = tuple(deltas)
    selected = select_lora_targets(model, targets, config.exclude)
    plan = []
    for name, module in selected:
        lora_wrapper_class(module)
        rank, alpha = config.rank_for(name), config.alpha_for(name)
        out_features, d = weight_matrix(module).shape
        if rank > min(out_features, d):
            raise ValueError(
                f"rank {rank} exceeds min(out, in) = {min(out_features, d)} of layer {name!r} "
                f"({type(module).__name__}, weight matrix {out_features}x{d}); lower rank or use rank_pattern"
            )
        plan.append((name, rank, alpha))
    names = [name for name, _, _ in plan]
    if "delta" in init.needs:
        missing = [n for n in names if deltas is None or n not in deltas]
        if missing:
            raise ValueError(f"init {config.init!r} needs a target weight change for every layer; missing: {', '.join(missing)}")
    if "input_stats" in init.needs:
        # Collected on the given model (read-only: no gradients, hooks removed afterwards), so a
        # forward function bound to it reaches the hooked layers.
        input_stats = _eva_stats(model, names, input_stats, calibration, forward)
    target = model if inplace else copy.deepcopy(model)

    for index, (name, rank, alpha) in enumerate(plan):
        base = target.get_submodule(name)
        layer = wrap_lora(base, rank, alpha, dropout=config.dropout, use_rslora=config.use_rslora)
        ctx = InitContext(
            name=name,
            seed=_layer_seed(config.seed, index),
            svd=config.svd,
            n_iter=config.n_iter,
            oversamples=config.oversamples,
            delta=deltas[name] if deltas is not None and name in deltas else None,
            input_stats=input_stats[name] if input_stats is not None and name in input_stats else None,
        )
        init.fn(layer, ctx)
        replace_module(target, name, layer)
    mark_only_lora_trainable(target)
    return target


def _layer_seed(seed: int, index: int) -> int:
    return (int(seed) * 1_000_003 + index) % (2**63 - 1)


def _eva_stats(model, names, input_stats, calibration, forward) -> Mapping[str, InputStats]:
    if input_stats is not None:
        missing = [n for n in names if n not in input_stats]
        if missing:
            raise ValueError(f"init 'eva': input_stats lacks layer(s) {', '.join(missing)}")
        return input_stats
    if calibration is None:
        raise ValueError("init 'eva' needs calibration data: pass calibration= (batches) or input_stats=")
    modules = [(n, model.get_submodule(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        return collect_input_stats(model, modules, calibration, forward)
    finally:
        model.train(was_training)


def add_lora(
    model: nn.Module,
    targets: str | Iterable[str] | None = None,
    rank: int = 8,
    alpha: float | None = None,
    *,
    init: str = "gaussian",
    dropout: float = 0.0,
    use_rslora: bool = False,
    exclude: str | Iterable[str] = (),
    svd: Literal["auto", "exact", "randomized"] = "auto",
    n_iter: int | Literal["auto"] = 4,
    oversamples: int = 0,
    seed: int = 0,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    inplace: bool = False,
    deltas: Mapping[str, torch.Tensor] | None = None,
    input_stats: Mapping[str, InputStats] | None = None,
    calibration: Iterable[Any] | None = None,
    forward: Callable[[Any], Any] | None = None,
) -> nn.Module:
    """Add LoRA adapters to a model: the keyword form of :func:`apply_lora`.

    Parameters
    ----------
    model : nn.Module
    targets : str, list of str, or None
        PEFT-style ``target_modules`` (see :class:`LoRAConfig`).
    rank : int
    alpha : float or None
        None means ``alpha = rank``.
    init : str
        ``"gaussian"``, ``"pissa"``, ``"milora"``, ``"svd_delta"``, ``"eva"`` or any registered init.
    dropout, use_rslora, exclude, svd, n_iter, oversamples, seed, rank_pattern, alpha_pattern
        See :class:`LoRAConfig`.
    inplace : bool
        False (default) returns an adapted copy; True adapts ``model`` itself.
    deltas, input_stats, calibration, forward
        Init data; see :func:`apply_lora`.

    Returns
    -------
    nn.Module
        The adapted model; only ``lora_A``/``lora_B`` parameters are trainable.

    Examples
    --------
    >>> lora_model = add_lora(model, ["query", "value"], rank=16, init="pissa")  # doctest: +SKIP
    """
    config = LoRAConfig(
        rank=rank,
        alpha=alpha,
        init=init,
        targets=_as_spec(targets),
        exclude=_as_spec(exclude),
        dropout=dropout,
        use_rslora=use_rslora,
        svd=svd,
        n_iter=n_iter,
        oversamples=oversamples,
        seed=seed,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
    )
    return apply_lora(
        model, config, inplace=inplace, deltas=deltas, input_stats=input_stats, calibration=calibration, forward=forward
    )


def mark_only_lora_trainable(model: nn.Module) -> nn.Module:
    """Freeze every parameter of ``model`` except the LoRA factors (in place; returns ``model``)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in lora_layers(model):
        layer.lora_A.weight.requires_grad_(True)
        layer.lora_B.weight.requires_grad_(True)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter-only state dict: ``<layer>.lora_A.weight``, ``<layer>.lora_B.weight`` and, for
    weight-moving inits, ``<layer>.lora_A_init`` / ``<layer>.lora_B_init``.

    Returns
    -------
    dict of str -> Tensor
        Detached clones, safe to save with ``safetensors.torch.save_file`` or ``torch.save``.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers")
    out: dict[str, torch.Tensor] = {}
    for name, layer in layers:
        out[f"{name}.lora_A.weight"] = layer.lora_A.weight.detach().clone()
        out[f"{name}.lora_B.weight"] = layer.lora_B.weight.detach().clone()
        if layer.moved_weight:
            out[f"{name}.lora_A_init"] = layer.lora_A_init.detach().clone()
            out[f"{name}.lora_B_init"] = layer.lora_B_init.detach().clone()
    return out


def load_lora_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True) -> nn.Module:
    """Load an adapter-only state dict into a model with matching LoRA layers (in place).

    Parameters
    ----------
    model : nn.Module
        A model from :func:`add_lora` with the same targets and ranks (for PiSSA/MiLoRA, built
        with the same init so its base holds the same residual).
    state_dict : dict of str -> Tensor
        From :func:`lora_state_dict`.
    strict : bool
        Raise on keys the model lacks and adapter tensors the state dict lacks.

    Returns
    -------
    nn.Module
        ``model``.

    Raises
    ------
    ValueError
        Naming unexpected or missing keys and shape mismatches; nothing is loaded then.
    """
    layers = dict(lora_layers(model))
    if not layers:
        raise ValueError("the model has no LoRA layers: add_lora() it first")
    updates: list[tuple[LoRALayer, str, torch.Tensor]] = []
    unexpected, mismatched = [], []
    for key, value in state_dict.items():
        name, suffix = _split_key(key)
        layer = layers.get(name)
        if layer is None or suffix is None:
            unexpected.append(key)
            continue
        current = _state_tensor(layer, suffix)
        if current is None or tuple(current.shape) != tuple(value.shape):
            expected = None if current is None else tuple(current.shape)
            mismatched.append(f"{key}: model has {expected}, state dict has {tuple(value.shape)}")
            continue
        updates.append((layer, suffix, value))
    missing = [
        f"{name}.{suffix}" for name, layer in layers.items() for suffix in ("lora_A.weight", "lora_B.weight")
        if f"{name}.{suffix}" not in state_dict
    ]
    problems = []
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched))
    if strict and unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    if strict and missing:
        problems.append("missing keys: " + ", ".join(missing))
    if problems:
        raise ValueError("cannot load the LoRA state dict: " + " | ".join(problems))
    with torch.no_grad():
        for layer, suffix, value in updates:
            _state_tensor(layer, suffix).copy_(value)
    return model


def _split_key(key: str) -> tuple[str, str | None]:
    for suffix in _STATE_KEYS:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return key, None


def _state_tensor(layer: LoRALayer, suffix: str) -> torch.Tensor | None:
    return {
        "lora_A.weight": layer.lora_A.weight,
        "lora_B.weight": layer.lora_B.weight,
        "lora_A_init": layer.lora_A_init,
        "lora_B_init": layer.lora_B_init,
    }[suffix]


def merge_lora(model: nn.Module, *, safe: bool = False) -> nn.Module:
    """Merge every adapter into its base weight (in place; the model computes the same function).

    Parameters
    ----------
    safe : bool
        Check every merged weight for NaN/Inf before writing it (``ValueError`` otherwise).
    """
    for _, layer in _require_layers(model):
        layer.merge(safe=safe)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_lora` (in place)."""
    for _, layer in _require_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module, *, safe: bool = False, inplace: bool = False) -> nn.Module:
    """A plain model with every adapter merged into its base weight and the wrappers removed.

    Parameters
    ----------
    model : nn.Module
        A model with LoRA layers.
    safe : bool
        Check merged weights for NaN/Inf before writing them.
    inplace : bool
        False (default): return a merged copy, leaving ``model`` with its adapters.

    Returns
    -------
    nn.Module
        Same architecture as before :func:`add_lora`; the merge is computed in float32 and cast
        back to each weight's dtype. ``requires_grad`` flags are left as they are (the base
        parameters stay frozen).
    """
    target = model if inplace else copy.deepcopy(model)
    layers = _require_layers(target)
    if safe:  # check everything before writing anything
        for name, layer in layers:
            if not layer.merged:
                W = weight_matrix(layer.base_layer)
                merged = W.detach().to(layer.delta_weight().dtype) + layer.delta_weight()
                if not bool(torch.isfinite(merged.to(W.dtype)).all()):
                    raise ValueError(f"merging layer {name!r} would write non-finite values; nothing was merged")
    for name, layer in layers:
        replace_module(target, name, layer.merge_and_unload(safe=safe))
    return target


def _require_layers(model: nn.Module) -> list[tuple[str, LoRALayer]]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers")
    return layers
