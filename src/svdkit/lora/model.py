"""Add LoRA adapters to a model.

``add_lora`` copies the model by default and returns the copy with adapters; the given model is
left as it was (PiSSA and MiLoRA rewrite base weights, so modifying in place by surprise would
be a trap). Pass ``inplace=True`` to wrap the given model's layers themselves, as PEFT does.

Everything that can be checked is checked before any layer is touched (selection, patterns,
ranks, init data and its shape and finiteness); if an init still fails midway with
``inplace=True``, the layers wrapped so far are taken out again and their weights restored.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Literal, Mapping

import torch
from torch import nn

from ..calibrate import GramStats, collect_input_stats
from ..layers.lora import LoRALayer, lora_kinds, lora_wrapper_class, wrap_lora
from ..linalg import Energy, ErrorTol, RankLike, SVDMethod, layer_seed, resolve_rank
from ..progress import ProgressLike, track
from ..surgery import check_patterns, find_targets, replace_module
from ..views import token_rows, view_of_kind, weight_matrix
from .config import LoRAConfig
from .inits import InitContext, LoRAInit, check_init_inputs, get_init, init_spectrum
from .state import (
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    mark_only_lora_trainable,
    merge_and_unload,
    merge_lora,
    unmerge_lora,
    unwrap_lora_layers,
)

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



def select_lora_targets(
    model: nn.Module, target_modules: str | Iterable[str] | None = None, exclude_modules: str | Iterable[str] = ()
) -> list[tuple[str, nn.Module]]:
    """Layers that :func:`add_lora` would wrap, as (name, module).

    ``target_modules`` and ``exclude_modules`` follow PEFT (see :class:`LoRAConfig`); embeddings
    are never selected, the output head only when named explicitly.

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
    if target_modules == "all-linear":
        selected = find_targets(model, None, exclude_modules=_as_spec(exclude_modules), kinds=_vector_kinds())
    else:
        selected = find_targets(model, _as_spec(target_modules), exclude_modules=_as_spec(exclude_modules), kinds=lora_kinds())
    if not selected:
        raise ValueError(
            f"no Linear, Conv1D or Conv2d layer of the model matches target_modules={target_modules!r} (exclude_modules={exclude_modules!r})"
        )
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
    input_stats: Mapping[str, GramStats] | None = None,
    calibration: Iterable[Any] | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    progress: ProgressLike = False,
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
        Target weight changes for ``init_lora_weights="svd_delta"`` (in :func:`svdkit.views.weight_matrix`
        orientation). With ``target_modules=None`` the layers are exactly the keys.
    input_stats : dict of name -> GramStats, optional
        Input statistics for ``init_lora_weights="eva"``, as :func:`svdkit.calibrate.collect_input_stats`
        returns them.
    calibration : iterable of batches, optional
        For ``init_lora_weights="eva"`` without ``input_stats``: batches run through the model (in eval
        mode, without gradients) to collect them.
    forward : callable, optional
        ``forward(module, batch) -> output`` runs the model on one calibration batch (svdkit's
        one forward contract, see :func:`svdkit.calibrate.collect_input_stats`).
    progress : bool or callable
        Show progress over the calibration batches and the layers (:func:`svdkit.progress.track`).

    Returns
    -------
    nn.Module
        The model with adapters: every parameter frozen except the adapters' ``lora_A`` and
        ``lora_B``. Its outputs equal the original model's for every init except
        ``svd_delta`` (up to float32 rounding for ``pissa``/``milora``). The new wrappers take
        the training mode of the layers they wrap (an ``eval()`` model gets no adapter dropout).

    Raises
    ------
    ValueError
        For a rank above ``min(out, in)`` of a selected layer, a ``rank_pattern`` /
        ``alpha_pattern`` key that matches no selected layer, missing, misshapen or non-finite
        init data, no matching layer, or a model that already has adapters; the message names
        the layer. Nothing is modified when it raises.
    """
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
    init = get_init(config.init_lora_weights)
    targets = config.target_modules
    if targets is None and deltas is not None and "delta" in init.needs:
        targets = tuple(deltas)
    selected = select_lora_targets(model, targets, config.exclude_modules)
    names = [name for name, _ in selected]
    check_patterns(config.rank_pattern, names, field="rank_pattern")
    check_patterns(config.alpha_pattern, names, field="alpha_pattern")
    for name, module in selected:
        try:
            lora_wrapper_class(module).check_base(module)
        except ValueError as exc:
            raise ValueError(f"layer {name!r}: {exc}; exclude it") from None
    if "delta" in init.needs:
        missing = [n for n in names if deltas is None or n not in deltas]
        if missing:
            raise ValueError(f"init {init.name!r} needs a target weight change for every layer; missing: {', '.join(missing)}")
    if "input_stats" in init.needs:
        # Collected on the given model (read-only: no gradients, hooks removed afterwards), so a
        # forward function bound to it reaches the hooked layers.
        input_stats = _eva_stats(model, selected, input_stats, calibration, forward, progress)
    plan = [
        (name, *_layer_rank_alpha(config, init, name, module, deltas, input_stats))
        for name, module in selected
    ]

    target = model if inplace else copy.deepcopy(model)
    placed: list[tuple[str, LoRALayer]] = []
    layer = None
    try:
        for index, (name, rank, alpha) in enumerate(track(plan, progress, desc=f"LoRA init ({init.name})")):
            layer = wrap_lora(target.get_submodule(name), rank, alpha, lora_dropout=config.lora_dropout, use_rslora=config.use_rslora)
            ctx = InitContext(
                name=name,
                seed=layer_seed(config.seed, index),
                svd_method=config.svd_method,
                n_iter=config.n_iter,
                oversamples=config.oversamples,
                delta=deltas[name] if deltas is not None and name in deltas else None,
                input_stats=input_stats[name] if input_stats is not None and name in input_stats else None,
            )
            try:
                init.fn(layer, ctx)
            except (ValueError, RuntimeError) as exc:
                raise ValueError(f"init {init.name!r} failed on layer {name!r}: {exc}") from exc
            replace_module(target, name, layer)
            placed.append((name, layer))
            layer = None
    except BaseException:
        if inplace:  # give the caller's model back as it was
            if layer is not None:
                layer.restore_moved_weight()
            unwrap_lora_layers(target, placed)
        raise
    mark_only_lora_trainable(target)
    return target


def _layer_rank_alpha(config, init: LoRAInit, name: str, module: nn.Module, deltas, input_stats) -> tuple[int, float]:
    """The resolved (rank, alpha) of one layer, after checking its init data."""
    spec = config.rank_for(name)
    delta = deltas.get(name) if deltas is not None and "delta" in init.needs else None
    stats = input_stats.get(name) if input_stats is not None and "input_stats" in init.needs else None
    is_int = isinstance(spec, int) and not isinstance(spec, bool)
    check_init_inputs(init, name, module, delta=delta, input_stats=stats, spectrum_needed=not is_int)
    out_features, d = weight_matrix(module).shape
    if is_int:
        if spec > min(out_features, d):
            raise ValueError(
                f"rank {spec} exceeds min(out, in) = {min(out_features, d)} of layer {name!r} "
                f"({type(module).__name__}, weight matrix {out_features}x{d}); lower the rank or use rank_pattern"
            )
        rank = int(spec)
    else:
        rank = _resolve_spec(spec, init, module, delta, stats)
    return rank, config.alpha_for(name, rank)


def _resolve_spec(spec: RankLike, init: LoRAInit, module: nn.Module, delta, stats) -> int:
    """A typed rank on the init's spectrum source, capped at ``min(out, d)``."""
    shape = tuple(weight_matrix(module).shape)
    if isinstance(spec, (Energy, ErrorTol)):
        S = init_spectrum(init, module, delta=delta, input_stats=stats)
        n = int(S.shape[0])
        return min(resolve_rank(S, spec, (n, n)), min(shape))
    return resolve_rank(None, spec, shape)


def _vector_kinds() -> tuple[str, ...]:
    """PEFT's "all-linear": the kinds LoRA wraps that act on the last axis of their input (no convolutions)."""
    return tuple(kind for kind in lora_kinds() if view_of_kind(kind).input_rows is token_rows)


def _eva_stats(model, selected, input_stats, calibration, forward, progress) -> Mapping[str, GramStats]:
    names = [name for name, _ in selected]
    if input_stats is not None:
        missing = [n for n in names if n not in input_stats]
        if missing:
            raise ValueError(f"init 'eva': input_stats lacks layer(s) {', '.join(missing)}")
        return input_stats
    if calibration is None:
        raise ValueError("init 'eva' needs calibration data: pass calibration= (batches) or input_stats=")
    was_training = model.training
    model.eval()
    try:
        # Data that does not fit names its batch and layer (svdkit.calibrate checks every input).
        return collect_input_stats(model, selected, track(calibration, progress, desc="EVA calibration batches"), forward)
    finally:
        model.train(was_training)


def add_lora(
    model: nn.Module,
    target_modules: str | Iterable[str] | None = None,
    r: RankLike = 8,
    lora_alpha: float | None = None,
    *,
    init_lora_weights: str = "gaussian",
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    exclude_modules: str | Iterable[str] = (),
    svd_method: SVDMethod = "auto",
    n_iter: int | Literal["auto"] = 4,
    oversamples: int = 0,
    seed: int = 0,
    rank_pattern: Mapping[str, RankLike] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    inplace: bool = False,
    deltas: Mapping[str, torch.Tensor] | None = None,
    input_stats: Mapping[str, GramStats] | None = None,
    calibration: Iterable[Any] | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    progress: ProgressLike = False,
) -> nn.Module:
    """Add LoRA adapters to a model: the keyword form of :func:`apply_lora`.

    Parameters
    ----------
    model : nn.Module
    target_modules : str, list of str, or None
        PEFT-style selection (see :class:`LoRAConfig`).
    r : int or RankSpec
        The rank, or a typed spec resolved per layer (see :class:`LoRAConfig`).
    lora_alpha : float or None
        None means ``lora_alpha = r`` (scaling 1).
    init_lora_weights : str
        ``"gaussian"``, ``"kaiming"``, ``"pissa"``, ``"milora"``, ``"svd_delta"``, ``"eva"`` or
        any registered init.
    lora_dropout, use_rslora, exclude_modules, svd_method, n_iter, oversamples, seed, rank_pattern, alpha_pattern
        See :class:`LoRAConfig`.
    inplace : bool
        False (default) returns an adapted copy; True adapts ``model`` itself.
    deltas, input_stats, calibration, forward, progress
        Init data and progress; see :func:`apply_lora`.

    Returns
    -------
    nn.Module
        The adapted model; only ``lora_A``/``lora_B`` parameters are trainable.

    Examples
    --------
    >>> lora_model = add_lora(model, ["query", "value"], r=16, init_lora_weights="pissa")  # doctest: +SKIP
    """
    config = LoRAConfig(
        r=r,
        lora_alpha=lora_alpha,
        init_lora_weights=init_lora_weights,
        target_modules=_as_spec(target_modules),
        exclude_modules=_as_spec(exclude_modules),
        lora_dropout=lora_dropout,
        use_rslora=use_rslora,
        svd_method=svd_method,
        n_iter=n_iter,
        oversamples=oversamples,
        seed=seed,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
    )
    return apply_lora(
        model, config, inplace=inplace, deltas=deltas, input_stats=input_stats, calibration=calibration,
        forward=forward, progress=progress,
    )
