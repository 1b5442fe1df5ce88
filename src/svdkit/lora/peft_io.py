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
"""

from __future__ import annotations

import collections
import copy
import json
import math
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..layers.lora import LoRALayer, lora_wrapper_class, wrap_lora
from ..surgery import replace_module
from .model import lora_layers, mark_only_lora_trainable

__all__ = ["export_peft", "find_root", "import_peft", "peft_factors"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.(?P<which>lora_A|lora_B)\.weight$")


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
    A : Tensor of shape (r', in) or (r', C_in, kh, kw)
    B : Tensor of shape (out, r') or (C_out, r', 1, 1)
    rank : int
        ``r' = r``, or ``2 r`` for a weight-moving init (see the module docstring).
    alpha : float
        Chosen so that PEFT's scaling equals the layer's.
    """
    A = layer.lora_A.weight.detach()
    B = layer.lora_B.weight.detach()
    if not layer.moved_weight:
        return A.clone(), B.clone(), layer.rank, layer.alpha
    A0 = layer.lora_A_init.reshape(A.shape).to(A.dtype)
    B0 = layer.lora_B_init.reshape(B.shape).to(B.dtype)
    factor = math.sqrt(2.0) if layer.use_rslora else 2.0
    return torch.cat([A, A0], dim=0), torch.cat([B, -B0], dim=1), 2 * layer.rank, layer.alpha * factor


def _most_common(values: list[Any]) -> Any:
    return collections.Counter(values).most_common(1)[0][0]


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def export_peft(
    model: nn.Module,
    directory: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    root: str | None = None,
    task_type: str | None = None,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
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

    Returns
    -------
    Path
        The directory.

    Notes
    -----
    ``peft.PeftModel.from_pretrained(base, directory)`` on the *unmodified* base model then
    computes what ``model`` computes: weight-moving adapters are converted at rank ``2r``.
    Ranks and alphas that differ between layers go to ``rank_pattern`` / ``alpha_pattern``,
    keyed by the escaped full module path.
    """
    st = _safetensors()
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
        A, B, rank, alpha = peft_factors(layer)
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
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    st.save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    return out


def _pattern_value(pattern: Mapping[str, Any], path: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first key ``k`` with ``re.match(r"(.*\\.)?(k)$", path)``."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / WEIGHTS_NAME).exists():
        return dict(_safetensors().load_file(str(directory / WEIGHTS_NAME)))
    if (directory / LEGACY_WEIGHTS_NAME).exists():
        return dict(torch.load(directory / LEGACY_WEIGHTS_NAME, map_location="cpu", weights_only=True))
    raise FileNotFoundError(f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {str(directory)!r}")


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {str(directory)!r}: not a PEFT adapter directory")
    config = json.loads(path.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{str(directory)!r} holds a {config.get('peft_type')!r} adapter; only LORA adapters can be imported")
    unsupported = [
        key for key, bad in (
            ("use_dora", bool(config.get("use_dora"))),
            ("lora_bias", bool(config.get("lora_bias"))),
            ("modules_to_save", bool(config.get("modules_to_save"))),
            ("layer_replication", bool(config.get("layer_replication"))),
            ("bias", config.get("bias", "none") != "none"),
        ) if bad
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
        If the adapter is not plain LoRA, or does not fit the model (a module it targets is
        missing or has other shapes); nothing is modified then.
    FileNotFoundError
        If the directory lacks the config or the weights.
    """
    directory = Path(directory)
    config = _read_config(directory)
    tensors = _load_tensors(directory)
    root_name, root_module = find_root(model, root)
    origin = config.get("base_model_name_or_path")
    for_model = f" (made for {origin!r})" if origin else ""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise ValueError(f"unsupported tensor {key!r} in the adapter at {str(directory)!r}: only lora_A/lora_B weights can be imported")
        pairs.setdefault(match["path"], {})[match["which"]] = value
    if not pairs:
        raise ValueError(f"the adapter at {str(directory)!r} holds no LoRA tensors")

    plans = []
    for path, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"the adapter at {str(directory)!r} has only {sorted(pair)} for {path!r}")
        try:
            module = root_module.get_submodule(path)
        except AttributeError:
            raise ValueError(
                f"the adapter at {str(directory)!r}{for_model} does not fit this model: it targets "
                f"{path!r}, which the model lacks (root {root_name or '<model>'!r})"
            ) from None
        if isinstance(module, LoRALayer):
            raise ValueError(f"{path!r} already has a LoRA adapter; merge_and_unload() the model first")
        try:
            lora_wrapper_class(module)
        except TypeError as exc:
            raise ValueError(f"the adapter at {str(directory)!r} targets {path!r}: {exc}") from None
        A, B = pair["lora_A"], pair["lora_B"]
        rank = int(A.shape[0])
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", 8)))
        plans.append((path, module, rank, alpha, A, B))

    use_rslora = bool(config.get("use_rslora", False))
    dropout = float(config.get("lora_dropout") or 0.0)
    for path, module, rank, alpha, A, B in plans:
        _check_shapes(module, rank, alpha, dropout, use_rslora, A, B, path, f"{str(directory)!r}{for_model}")

    target = model if inplace else copy.deepcopy(model)
    _, target_root = find_root(target, root_name)
    for path, _, rank, alpha, A, B in plans:
        layer = wrap_lora(target_root.get_submodule(path), rank, alpha, dropout=dropout, use_rslora=use_rslora)
        with torch.no_grad():
            layer.lora_A.weight.copy_(A)
            layer.lora_B.weight.copy_(B)
        replace_module(target_root, path, layer)
    if trainable:
        mark_only_lora_trainable(target)
    else:
        for p in target.parameters():
            p.requires_grad_(False)
    return target


def _check_shapes(module, rank, alpha, dropout, use_rslora, A, B, path, where) -> None:
    """Raise unless ``A``/``B`` have the shapes a wrapper of ``module`` would give them (the
    throwaway wrapper only references ``module``; nothing is modified)."""
    try:
        layer = wrap_lora(module, rank, alpha, dropout=dropout, use_rslora=use_rslora)
    except ValueError as exc:
        raise ValueError(f"the adapter at {where} does not fit layer {path!r} of this model: {exc}") from None
    expected = (tuple(layer.lora_A.weight.shape), tuple(layer.lora_B.weight.shape))
    got = (tuple(A.shape), tuple(B.shape))
    if expected != got:
        raise ValueError(
            f"the adapter at {where} does not fit layer {path!r} of this model: it has lora_A {got[0]} and "
            f"lora_B {got[1]}, the layer needs {expected[0]} and {expected[1]}"
        )
