"""Read and write PEFT's on-disk LoRA adapter format.

A directory with ``adapter_config.json`` and ``adapter_model.safetensors`` whose tensors are named
``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight``, where ``<module path>`` is
the layer's name inside the transformers model that ``peft.PeftModel.from_pretrained`` wraps.

For a model that holds a transformers model inside it (a sentence-transformers model holds its
``BertModel`` at ``0.model``), that inner model is the *root*: paths are written relative to it.
By default the root is the first submodule (or the model itself) that looks like a transformers
``PreTrainedModel``.

Adapters whose init moved part of the base weight (PiSSA, MiLoRA) describe an update of the
*residual* base. They are exported as plain LoRA for the unmodified base, at rank ``2r``
(PEFT's conversion): ``A' = [A ; A_init]``, ``B' = [B | -B_init]`` and ``alpha' = 2 alpha``
(``sqrt(2) alpha`` with rsLoRA), so that ``W + s B' A' = (W - s B_init A_init) + s B A``.

Adapters that PEFT saved with ``init_lora_weights="pissa"`` or ``"olora"`` are imported as PEFT
loads them: the base's residual is rebuilt first (:mod:`svdkit.lora.peft_inits`); inits whose
residual cannot be rebuilt exactly are refused with the way to convert them.
"""

from __future__ import annotations

import collections
import copy
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..layers.lora import LoRALayer, lora_wrapper_class, wrap_lora
from ..surgery import pattern_key, pattern_value, replace_module
from ..views import get_view
from .config import PEFT_BOOKKEEPING, is_neutral
from .peft_inits import peft_load_init
from .state import lora_layers, mark_only_lora_trainable, unwrap_lora_layers

__all__ = ["check_adapter_target", "export_peft", "find_root", "import_peft", "peft_factors"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.(?P<which>lora_A|lora_B)\.weight$")
_ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME)
# the files of a model directory: an adapter written beside them changes what the directory loads as
_MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "modules.json",
                "svdkit_compressed.json")
# adapter_config.json keys the import reads, or may ignore because the tensors decide (which
# layers) or because they only matter while PEFT initialises (the init's own config)
_IMPORT_KEYS = PEFT_BOOKKEEPING | {
    "r", "lora_alpha", "lora_dropout", "use_rslora", "rank_pattern", "alpha_pattern", "init_lora_weights",
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
    "eva_config", "corda_config", "loftq_config", "lora_ga_config",
}


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("PEFT adapter files need safetensors: pip install 'svdkit[hf]'") from exc
    return st


def find_root(model: nn.Module, root: str | None = None) -> tuple[str, nn.Module]:
    """The submodule PEFT wraps: ``root`` if given, else the first transformers-like model inside.

    Parameters
    ----------
    model : nn.Module
    root : str or None
        Dotted name of the submodule (``""`` for the model itself).

    Returns
    -------
    (name, module)
    """
    if root is not None:
        if root == "":
            return "", model
        try:
            return root, model.get_submodule(root)
        except AttributeError:
            raise ValueError(f"the model has no submodule {root!r} to use as the PEFT root") from None
    for name, module in model.named_modules():
        if hasattr(module, "config") and hasattr(module, "base_model_prefix"):
            return name, module
    return "", model


def _relative(name: str, root: str) -> str:
    if not root:
        return name
    if not name.startswith(root + "."):
        raise ValueError(f"LoRA layer {name!r} is outside the PEFT root {root!r}; pass root= explicitly")
    return name[len(root) + 1:]


def peft_factors(layer: LoRALayer) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """A layer's adapter as plain LoRA for the unmodified base, in PEFT's tensor shapes.

    Returns
    -------
    B : Tensor of shape (out, r') or (C_out, r', 1, 1)
        ``lora_B``'s weight, the left factor.
    A : Tensor of shape (r', in) or (r', C_in, kh, kw)
        ``lora_A``'s weight, the right factor.
    r : int
        ``r' = r``, or ``2 r`` for a weight-moving init (see the module docstring).
    lora_alpha : float
        Chosen so that PEFT's scaling equals the layer's.
    """
    A = layer.lora_A.weight.detach()
    B = layer.lora_B.weight.detach()
    if not layer.moved_weight:
        return B.clone(), A.clone(), layer.rank, layer.lora_alpha
    A0 = layer.lora_A_init.reshape(A.shape).to(A.dtype)
    B0 = layer.lora_B_init.reshape(B.shape).to(B.dtype)
    factor = math.sqrt(2.0) if layer.use_rslora else 2.0
    return torch.cat([B, -B0], dim=1), torch.cat([A, A0], dim=0), 2 * layer.rank, layer.lora_alpha * factor


def _most_common(values: list[Any]) -> Any:
    return collections.Counter(values).most_common(1)[0][0]


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def check_adapter_target(directory: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse a directory :func:`export_peft` must not write: a file, a model's directory
    (transformers would then load that model with the adapter applied), or one holding an
    adapter already, without ``overwrite``.

    Raises
    ------
    FileExistsError, ValueError
        Naming the directory and what is in it.
    """
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise ValueError(f"cannot write the adapter to {str(out)!r}: it exists and is not a directory")
    model_files = [name for name in _MODEL_FILES if (out / name).exists()]
    if model_files:
        raise ValueError(
            f"refusing to write the adapter into {str(out)!r}: it holds a model ({', '.join(model_files)}), which would then "
            "load with the adapter applied; choose a directory of its own"
        )
    existing = [name for name in _ADAPTER_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{str(out)!r} already holds a PEFT adapter ({', '.join(existing)}); pass overwrite=True to replace it")


def export_peft(
    model: nn.Module,
    directory: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    root: str | None = None,
    task_type: str | None = None,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a model's LoRA adapters as a PEFT adapter directory.

    Parameters
    ----------
    model : nn.Module
        A model with LoRA layers (from :func:`svdkit.lora.add_lora`, :func:`extract_lora` or
        :func:`import_peft`).
    directory : str or Path
        Created if needed; ``adapter_config.json`` and ``adapter_model.safetensors`` are written.
    base_model_name_or_path : str, optional
        Recorded in the config (default: the root model's ``name_or_path``, if any).
    root : str, optional
        Dotted name of the transformers model inside ``model`` (see :func:`find_root`).
    task_type : str, optional
        PEFT ``task_type`` (e.g. ``"CAUSAL_LM"``); None for a bare ``PeftModel``.
    revision : str, optional
    dtype : torch.dtype, optional
        Dtype of the saved tensors (default: the adapters' own).
    overwrite : bool
        Replace an adapter already in ``directory`` (its config and weights, a legacy
        ``adapter_model.bin`` included). Without it an existing adapter is never touched.

    Returns
    -------
    Path
        The directory.

    Raises
    ------
    FileExistsError
        If ``directory`` already holds a PEFT adapter and ``overwrite`` is False.
    ValueError
        If ``directory`` holds a model (``config.json``, weights): transformers would load that
        model with the adapter applied.

    Notes
    -----
    ``peft.PeftModel.from_pretrained(base, directory)`` on the *unmodified* base model then
    computes what ``model`` computes: weight-moving adapters are converted at rank ``2r``.
    Ranks and alphas that differ between layers go to ``rank_pattern`` / ``alpha_pattern``,
    keyed by the escaped full module path.
    """
    st = _safetensors()
    out = Path(directory)
    check_adapter_target(out, overwrite)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to export")
    root_name, root_module = find_root(model, root)
    rslora = {layer.use_rslora for _, layer in layers}
    if len(rslora) > 1:
        raise ValueError("PEFT's config has one use_rslora flag; the model mixes rsLoRA and plain scaling")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    fan_in_fan_out = False
    for name, layer in layers:
        path = _relative(name, root_name)
        B, A, rank, alpha = peft_factors(layer)
        if dtype is not None:
            A, B = A.to(dtype), B.to(dtype)
        tensors[f"{_PREFIX}{path}.lora_A.weight"] = A.contiguous().cpu()
        tensors[f"{_PREFIX}{path}.lora_B.weight"] = B.contiguous().cpu()
        ranks[path], alphas[path] = rank, alpha
        fan_in_fan_out |= layer.kind == "conv1d"
    r = _most_common(list(ranks.values()))
    lora_alpha = _most_common(list(alphas.values()))
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(root_module, "name_or_path", None) or None
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": revision,
        "inference_mode": True,
        "r": r,
        "lora_alpha": _number(lora_alpha),
        "lora_dropout": _most_common([layer.dropout_p for _, layer in layers]),
        "use_rslora": rslora.pop(),
        "target_modules": sorted(ranks),
        "exclude_modules": None,
        "rank_pattern": {re.escape(p): k for p, k in ranks.items() if k != r},
        "alpha_pattern": {re.escape(p): _number(a) for p, a in alphas.items() if a != lora_alpha},
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "lora_bias": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    _write_adapter(out, json.dumps(config, indent=2, sort_keys=True) + "\n", tensors, st, replace_legacy=overwrite)
    return out


def _write_adapter(out: Path, config_text: str, tensors: dict[str, torch.Tensor], st, *, replace_legacy: bool) -> None:
    """Write both files beside their final names, then move them into place, so a failure
    leaves an existing adapter as it was (and removes a directory this call created)."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    tmp_config, tmp_weights = out / f".{CONFIG_NAME}.partial", out / f".{WEIGHTS_NAME}.partial"
    try:
        tmp_config.write_text(config_text)
        st.save_file(tensors, str(tmp_weights), metadata={"format": "pt"})
        os.replace(tmp_weights, out / WEIGHTS_NAME)
        os.replace(tmp_config, out / CONFIG_NAME)
    except BaseException:
        for tmp in (tmp_config, tmp_weights):
            tmp.unlink(missing_ok=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    if replace_legacy and (out / LEGACY_WEIGHTS_NAME).exists():
        (out / LEGACY_WEIGHTS_NAME).unlink()  # a stale .bin beside the new weights would be ambiguous


def _load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors, with an error naming the file when it cannot be read."""
    path = directory / WEIGHTS_NAME
    if path.exists():
        st = _safetensors()
        try:
            return dict(st.load_file(str(path)))
        except Exception as exc:  # safetensors raises its own SafetensorError for corrupt files
            raise ValueError(f"cannot read the adapter weights {str(path)!r} (truncated or not a safetensors file): {exc}") from None
    path = directory / LEGACY_WEIGHTS_NAME
    if path.exists():
        try:
            return dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as exc:
            raise ValueError(f"cannot read the adapter weights {str(path)!r} (truncated or not a torch file): {exc}") from None
    raise FileNotFoundError(f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {str(directory)!r}")


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {str(directory)!r}: not a PEFT adapter directory")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"cannot read the adapter config {str(path)!r}: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"the adapter config {str(path)!r} is not a JSON object")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{str(directory)!r} holds a {config.get('peft_type')!r} adapter; only LORA adapters can be imported")
    unsupported = [
        f"{key}={config[key]!r}" for key in sorted(config)
        if key not in _IMPORT_KEYS and not is_neutral(config[key])
    ]
    if unsupported:
        raise ValueError(f"the adapter in {str(directory)!r} uses {', '.join(unsupported)}, which svdkit cannot import")
    return config


def import_peft(
    directory: str | Path,
    model: nn.Module,
    *,
    root: str | None = None,
    inplace: bool = False,
    trainable: bool = False,
) -> nn.Module:
    """Load a PEFT LoRA adapter directory onto a model as svdkit LoRA layers.

    Parameters
    ----------
    directory : str or Path
        With ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``).
    model : nn.Module
        The base model the adapter was made for (or a model holding it, see ``root``).
    root : str, optional
        Dotted name of the transformers model inside ``model`` (see :func:`find_root`).
    inplace : bool
        False (default) returns an adapted copy; True wraps ``model``'s layers.
    trainable : bool
        Leave the adapters trainable (everything else frozen); by default everything is frozen,
        as in PEFT's inference mode.

    Returns
    -------
    nn.Module

    Raises
    ------
    ValueError
        If a file cannot be read (the message names it), the adapter is not plain LoRA, its
        tensors disagree with its config (a rank other than ``r`` / ``rank_pattern`` says) or
        hold NaN/Inf, it does not fit the model (a module it targets is missing or has other
        shapes), or PEFT saved it with an init whose load-time rewrite of the base svdkit cannot
        redo exactly (``pissa_niter_K``, CorDA, LoftQ, LoRA-GA; the message says how to convert
        it). Nothing is modified then.
    FileNotFoundError
        If the directory lacks the config or the weights.

    Notes
    -----
    An adapter PEFT saved with ``init_lora_weights="pissa"`` or ``"olora"`` is only meaningful
    on the base PEFT rebuilds at load time, ``W - s B0 A0``; the import rebuilds that residual
    exactly as PEFT does (:mod:`svdkit.lora.peft_inits`), so outputs match PEFT's, and keeps
    ``B0, A0`` as the layers' init factors. The new wrappers take the training mode of the
    layers they wrap.
    """
    directory = Path(directory)
    config = _read_config(directory)
    root_name, root_module = find_root(model, root)
    origin = config.get("base_model_name_or_path")
    where = f"{str(directory)!r}" + (f" (made for {origin!r})" if origin else "")
    load_init = peft_load_init(config.get("init_lora_weights", True), where)
    tensors = _load_tensors(directory)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise ValueError(f"unsupported tensor {key!r} in the adapter at {str(directory)!r}: only lora_A/lora_B weights can be imported")
        bad = int((~torch.isfinite(value)).sum()) if value.is_floating_point() else 0
        if bad:
            raise ValueError(f"the adapter at {str(directory)!r} is damaged: tensor {key!r} holds {bad} non-finite value(s) (NaN/Inf)")
        pairs.setdefault(match["path"], {})[match["which"]] = value
    if not pairs:
        raise ValueError(f"the adapter at {str(directory)!r} holds no LoRA tensors")

    plans = []
    for path, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"the adapter at {str(directory)!r} has only {sorted(pair)} for {path!r}")
        A, B = pair["lora_A"], pair["lora_B"]
        rank = int(A.shape[0])
        _check_config_rank(config, path, A, B, where)
        try:
            module = root_module.get_submodule(path)
        except AttributeError:
            raise ValueError(
                f"the adapter at {where} does not fit this model: it targets "
                f"{path!r}, which the model lacks (root {root_name or '<model>'!r})"
            ) from None
        if isinstance(module, LoRALayer):
            raise ValueError(f"{path!r} already has a LoRA adapter; merge_and_unload() the model first")
        try:
            lora_wrapper_class(module)
        except TypeError as exc:
            raise ValueError(f"the adapter at {str(directory)!r} targets {path!r}: {exc}") from None
        alpha = float(_config_value(config, "alpha_pattern", path, config.get("lora_alpha", 8), where))
        load_init.check_layer(get_view(module).kind, module.weight, path, where)
        plans.append((path, module, rank, alpha, A, B))

    use_rslora = bool(config.get("use_rslora", False))
    dropout = float(config.get("lora_dropout") or 0.0)
    for path, module, rank, alpha, A, B in plans:
        _check_shapes(module, rank, alpha, dropout, use_rslora, A, B, path, where)

    target = model if inplace else copy.deepcopy(model)
    _, target_root = find_root(target, root_name)
    placed: list[tuple[str, LoRALayer]] = []
    layer = None
    try:
        for path, _, rank, alpha, A, B in plans:
            layer = wrap_lora(target_root.get_submodule(path), rank, alpha, lora_dropout=dropout, use_rslora=use_rslora)
            if load_init.residual is not None:  # the base PEFT rebuilds before loading A and B
                B0, A0, residual = load_init.residual(layer)
                layer.move_into_adapter(B0, A0, residual=residual)
            with torch.no_grad():
                layer.lora_A.weight.copy_(A)
                layer.lora_B.weight.copy_(B)
            replace_module(target_root, path, layer)
            placed.append((path, layer))
            layer = None
    except BaseException:
        if inplace:  # give the caller's model back as it was
            if layer is not None:
                layer.restore_moved_weight()
            unwrap_lora_layers(target_root, placed)
        raise
    if trainable:
        mark_only_lora_trainable(target)
    else:
        for p in target.parameters():
            p.requires_grad_(False)
    return target


def _config_value(config: dict[str, Any], field: str, path: str, default: Any, where: str) -> Any:
    """PEFT's per-module value: the first ``config[field]`` key matching ``path``, else ``default``."""
    try:
        return pattern_value(config.get(field) or {}, path, default)
    except re.error as exc:
        raise ValueError(f"the adapter config at {where} has a {field} key that is not a valid regex: {exc}") from None


def _check_config_rank(config: dict[str, Any], path: str, A: torch.Tensor, B: torch.Tensor, where: str) -> None:
    """Raise when the tensors' rank is not the one the config gives the module (PEFT would build
    layers of the config's rank and fail to load them, or load something else)."""
    r = config.get("r", 8)
    expected = _config_value(config, "rank_pattern", path, r, where)
    ranks = {int(A.shape[0]), int(B.shape[1]) if B.ndim >= 2 else -1}
    if ranks != {int(expected)}:
        key = pattern_key(config.get("rank_pattern") or {}, path)
        source = f"rank_pattern[{key!r}]" if key is not None else f"r={r}"
        raise ValueError(
            f"the adapter at {where} does not match its config: {path!r} should have rank {expected} ({source}), "
            f"but its tensors have lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}"
        )


def _check_shapes(module, rank, alpha, dropout, use_rslora, A, B, path, where) -> None:
    """Raise unless ``A``/``B`` have the shapes a wrapper of ``module`` would give them (the
    throwaway wrapper only references ``module``; nothing is modified)."""
    try:
        layer = wrap_lora(module, rank, alpha, lora_dropout=dropout, use_rslora=use_rslora)
    except ValueError as exc:
        raise ValueError(f"the adapter at {where} does not fit layer {path!r} of this model: {exc}") from None
    expected = (tuple(layer.lora_A.weight.shape), tuple(layer.lora_B.weight.shape))
    got = (tuple(A.shape), tuple(B.shape))
    if expected != got:
        raise ValueError(
            f"the adapter at {where} does not fit layer {path!r} of this model: it has lora_A {got[0]} and "
            f"lora_B {got[1]}, the layer needs {expected[0]} and {expected[1]}"
        )
