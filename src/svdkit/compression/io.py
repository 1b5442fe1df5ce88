"""Save and load compressed models: a JSON description plus safetensors, never a pickle.

A saved directory holds

- ``svdkit_compressed.json``: the format version, the factorized layers with their geometry
  (each low-rank class's ``spec()``), the model spec it came from (a path is stored absolute),
  the compression config, the report's totals and quality figures, the saved dtype, how plain
  transformers loads the directory (or why it cannot), the modules the model's class builds from
  its config but the model was built without (``absent_modules``: a BERT or ViT without its
  pooler; left out again on loading), and the SHA-256 of every weight file;
- ``model.safetensors``: every tensor of the compressed model's state dict (a tied weight once),
  in the dtype asked for;
- for a transformers model, its ``config.json`` (and ``generation_config.json``), and the
  tokenizer when one is given, so the directory loads and generates with nothing else at hand;
  ``config.json`` is written for plain transformers (``auto_map``, the ranks) with the modeling
  file ``modeling_svdkit.py`` when the model allows it (:mod:`svdkit.export.remote_code`);
- ``README.md``: the model card.

:mod:`svdkit.compression.saved` writes everything but the weights, for this module and for the
streamed writer alike. Format version 3 added the export, the card, the dtype and the quality;
versions 1 and 2 (a plain transformers ``config.json``) still load.

:func:`load_compressed` checks everything (description, hashes, every layer against its base,
every tensor name and shape) before it touches the model it rebuilds, so a failed load leaves a
given base exactly as it was. :func:`decompress` turns factorized layers back into dense ones.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..export.dtype import parse_dtype, weights_dtype
from ..export.modeling_lowrank import drop_modules
from ..export.plain_save import guard_plain_save
from ..files import replace_directory, save_tensors
from ..layers.lowrank import LowRankLayer, low_rank_from_spec
from ..surgery import get_module, replace_module
from ..quantization.record import quantization_record, read_quantized
from ..quantization.storage import flatten_state, is_quantized
from .saved import CONFIG_NAME, FORMAT_VERSION, INDEX_NAME, READABLE_VERSIONS, WEIGHTS_NAME, sha256, write_saved_files
from .transformers_files import transformers_skeleton

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "INDEX_NAME",
    "PROGRESS_NAME",
    "WEIGHTS_NAME",
    "check_save_target",
    "decompress",
    "factorized_layers",
    "load_compressed",
    "read_description",
    "save_compressed",
    "weight_files",
]

PROGRESS_NAME = "svdkit_progress.json"


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("saving and loading compressed models needs safetensors: pip install 'svdkit[hf]'") from exc
    return safetensors


def factorized_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The factorized layers of a model and their geometry, keyed by module name.

    A layer that sits at several names (one module used twice) is described at its first name;
    every other name maps to ``{"same_as": first_name}``. A layer whose factors are another's
    (tied weights) says so with ``"shares_factors_with": that_name``; one that shares only one
    factor (experts with a shared basis) with ``"shares_factor": {"u" or "v": that_name}``.
    """
    first: dict[int, str] = {}
    factor_owner: dict[int, str] = {}
    layers: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, LowRankLayer):
            if id(module) in first:
                layers[name] = {"same_as": first[id(module)]}
                continue
            first[id(module)] = name
            layers[name] = module.spec()
            owners = {}
            for key in ("u", "v"):
                factor = getattr(module, key, None)
                if factor is None:
                    continue
                if id(factor) in factor_owner:
                    owners[key] = factor_owner[id(factor)]
                else:
                    factor_owner[id(factor)] = name
            if len(owners) == 2 and owners["u"] == owners["v"]:
                layers[name]["shares_factors_with"] = owners["u"]
            elif owners:
                layers[name]["shares_factor"] = owners
    return layers


def check_save_target(target: Path, overwrite: bool) -> None:
    """Refuse a directory :func:`save_compressed` must not write: the current directory or one
    above it, an existing path without ``overwrite``, or one that is not an svdkit output.

    Raises
    ------
    FileExistsError, ValueError
        Naming the path and what to do.
    """
    resolved = target.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise ValueError(f"cannot save into {target}: it is the current directory or one above it; name a new directory")
    if target.exists():
        if not overwrite:
            raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
        if not target.is_dir() or not (target / CONFIG_NAME).is_file():
            raise ValueError(
                f"refusing to overwrite {target}: it is not an svdkit compressed model directory (no {CONFIG_NAME}); "
                "remove it yourself or choose another path"
            )


def save_compressed(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    source: str | None = None,
    config: Any = None,
    tokenizer: Any = None,
    report: Any = None,
    overwrite: bool = False,
    dtype: str | torch.dtype | None = None,
) -> Path:
    """Write a compressed model to ``directory`` atomically.

    Parameters
    ----------
    model : nn.Module
        A model with factorized layers (from :func:`svdkit.compress`).
    directory : path
    source : str, optional
        The model spec of the dense original (e.g. ``"minilm"``); a path is stored absolute.
    config : CompressConfig, optional
        Recorded for reference.
    tokenizer : transformers tokenizer, optional
        Saved beside the weights (``save_pretrained``).
    report : CompressionReport, optional
        Its totals are recorded.
    overwrite : bool
        Replace an existing svdkit output directory (never any other directory).
    dtype : {"float32", "bfloat16", "float16", "float64"} or torch.dtype, optional
        Cast the saved floating-point weights (the model is not changed); default: the model's
        own dtype. Recorded in ``config.json``, so that transformers and
        :func:`load_compressed` load the model in it. A model whose weights were quantized
        (:func:`svdkit.quantization.quantize_weights`) is saved in its own dtype.

    Returns
    -------
    Path of the directory.

    Raises
    ------
    FileExistsError
        ``directory`` exists and ``overwrite`` is False.
    ValueError
        ``directory`` is the current directory (or above it), or exists without being an svdkit
        output; ``dtype`` is not a floating-point dtype, or differs from a quantized model's.

    Warns
    -----
    UserWarning
        A transformers model that plain transformers cannot load (a factorized embedding or
        convolution, factors shared by two layers): the warning and the description say why.

    Notes
    -----
    Everything is written to a temporary directory beside the target and renamed into place,
    so an interrupted save never leaves a half-written model, and a failed replacement leaves
    the old directory where it was. The directory and its files get the permissions the umask
    gives (0755 and 0644 under umask 022), as ``save_pretrained``'s do. Beside the weights and
    the description it holds a model card (``README.md``) and, for a transformers model, what
    ``AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)`` needs to load it
    without svdkit (see :mod:`svdkit.export`).
    """
    _safetensors()
    cast = parse_dtype(dtype)
    target = Path(directory)
    check_save_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    if source is not None and Path(source).exists():
        source = str(Path(source).resolve())
    state = model.state_dict(keep_vars=True)
    quantization = quantization_record(model, state, cast)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        if quantization is None:
            save_tensors(staging / WEIGHTS_NAME, state, dtype=cast)
        else:
            tensors, header, _ = flatten_state(state)
            save_tensors(staging / WEIGHTS_NAME, tensors, dtype=cast, metadata=header, exact=set(tensors) - set(state))
        write_saved_files(model, staging, weight_files=[WEIGHTS_NAME], layers=factorized_layers(model),
                          dtype=cast or weights_dtype(state.values()), source=source, config=config, report=report,
                          tokenizer=tokenizer, target=target, quantization=quantization)
        replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def read_description(directory: str | os.PathLike) -> dict[str, Any]:
    """The validated ``svdkit_compressed.json`` of a saved directory.

    Raises
    ------
    FileNotFoundError
        No directory, description or weights.
    ValueError
        A corrupted description, an unknown format version, or a malformed layer table.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no compressed model directory at {directory}")
    if (directory / PROGRESS_NAME).exists():
        raise ValueError(f"{directory} holds an unfinished compression: {_progress_note(directory / PROGRESS_NAME)}")
    if not (directory / CONFIG_NAME).exists():
        raise FileNotFoundError(f"{directory} is missing {CONFIG_NAME}: not a complete svdkit compressed model")
    try:
        meta = json.loads((directory / CONFIG_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{directory / CONFIG_NAME} is corrupted: {exc}") from exc
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version not in READABLE_VERSIONS:
        raise ValueError(f"{directory / CONFIG_NAME} has format version {version!r}; this svdkit reads versions {READABLE_VERSIONS}")
    if not isinstance(meta.get("layers"), dict):
        raise ValueError(f"{directory / CONFIG_NAME} has no 'layers' table")
    absent = meta.get("absent_modules")
    if absent is not None and not (isinstance(absent, list) and all(isinstance(a, str) and a for a in absent)):
        raise ValueError(f"{directory / CONFIG_NAME}: 'absent_modules' must be a list of module names, got {absent!r}")
    files = meta.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise ValueError(f"{directory / CONFIG_NAME}: 'files' must map file names to SHA-256 hex digests")
    for name in weight_files(meta):
        if not (directory / name).exists():
            raise FileNotFoundError(f"{directory} is missing {name}: not a complete svdkit compressed model")
    return meta


def _progress_note(progress: Path) -> str:
    """What an unfinished streamed compression has done, and how to finish it."""
    try:
        state = json.loads(progress.read_text())
    except (OSError, ValueError):
        state = {}
    state = state if isinstance(state, dict) else {}
    source = state.get("source") or "SOURCE"
    return (f"{state.get('blocks_done', '?')} block(s) done ({PROGRESS_NAME}); finish it with "
            f"`svdkit compress {source} -o {progress.parent} --resume` with the options of the first run "
            "(or compress_to_directory(..., resume=True)) before loading it")


def weight_files(meta: Mapping[str, Any]) -> list[str]:
    """The weight files of a saved directory: its shards (recorded with their hashes), or the one
    ``model.safetensors`` of format version 1."""
    files = [name for name in meta.get("files", {}) if name.endswith(".safetensors")]
    return files or [WEIGHTS_NAME]


def _verify_files(directory: Path, meta: Mapping[str, Any]) -> None:
    for name, digest in meta.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(f"{directory} is missing {name}, which its description lists")
        if sha256(path) != digest:
            raise ValueError(
                f"{path} does not match the SHA-256 recorded in {CONFIG_NAME}: the file is damaged or was changed "
                "(to load it anyway: verify=False in svdkit.load_compressed / svdkit.load_model, --no-verify in svdkit eval)"
            )


def _skeletons(model: nn.Module, layers: Mapping[str, Any], where: Path) -> dict[str, nn.Module]:
    """The replacement of every described layer, built empty, keyed by the names to replace in
    ``model``. A layer described inside one described before it (an expert of an
    :class:`~svdkit.layers.experts.ExpertBank`) is put inside that one."""
    built: dict[str, nn.Module] = {}
    top: dict[str, nn.Module] = {}
    for name, spec in layers.items():
        owner, inner = _owner(model, built, name)
        try:
            dense = get_module(owner, inner)
        except KeyError:
            raise ValueError(f"the base model has no layer {name!r} that {where} factorizes: wrong base model?") from None
        alias = spec.get("same_as") if isinstance(spec, Mapping) else None
        if alias is not None:
            if alias not in built:
                raise ValueError(f"saved layer {name} is described as the same module as {alias!r}, which is not described before it")
            if get_module(model, alias) is not dense:
                raise ValueError(f"saved layers {alias} and {name} are one module, but they are two in the base model")
            built[name] = built[alias]
            if owner is model:
                top[name] = built[alias]
            continue
        built[name] = low_rank_from_spec(spec, dense, name=name)
        if owner is model:
            top[name] = built[name]
        else:
            replace_module(owner, inner, built[name])
        shared = {"u": spec["shares_factors_with"], "v": spec["shares_factors_with"]} if "shares_factors_with" in spec else spec.get("shares_factor", {})
        if not isinstance(shared, Mapping):
            raise ValueError(f"saved layer {name}: 'shares_factor' must map 'u' or 'v' to a layer name, got {shared!r}")
        for factor, factor_owner in shared.items():
            if not isinstance(built.get(factor_owner), LowRankLayer):
                raise ValueError(f"saved layer {name} shares the factors of {factor_owner!r}, which is not described before it")
            try:
                built[name].share_factors_with(built[factor_owner], (factor,))
            except TypeError as exc:
                raise ValueError(f"saved layers {factor_owner} and {name} cannot share factors: {exc}") from None
    return top


def _owner(model: nn.Module, built: Mapping[str, nn.Module], name: str) -> tuple[nn.Module, str]:
    """(the module that holds layer ``name``, its name there): the innermost layer built before
    that contains it, else the model."""
    for prefix in sorted(built, key=len, reverse=True):
        if name.startswith(prefix + "."):
            return built[prefix], name[len(prefix) + 1:]
    return model, name


def _expected_state(model: nn.Module, skeletons: Mapping[str, nn.Module]) -> tuple[dict[str, tuple[int, ...]], list[list[str]]]:
    """The state dict the rebuilt model will hold, without building it.

    Returns
    -------
    shapes : dict of key -> shape
        Every tensor of the rebuilt model's state dict.
    groups : list of list of str
        Keys that hold one tensor (tied weights, a module used twice), which a saved file holds
        under one of its names.
    """
    replaced = {f"{name}.": module for name, module in skeletons.items()}
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if not any(key.startswith(prefix) for prefix in replaced):
            tensors[key] = tensor
    for prefix, module in replaced.items():
        for key, tensor in module.state_dict(keep_vars=True).items():
            tensors[prefix + key] = tensor
    groups: dict[int, list[str]] = {}
    for key, tensor in tensors.items():
        groups.setdefault(id(tensor), []).append(key)
    return {key: tuple(t.shape) for key, t in tensors.items()}, list(groups.values())


def _reshare(model: nn.Module, groups: list[list[str]]) -> None:
    """Make every key of a group hold the first key's parameter again (assigning a loaded state
    dict gives each key its own parameter, which would untie tied weights)."""
    for keys in groups:
        if len(keys) < 2:
            continue
        module_name, _, attr = keys[0].rpartition(".")
        shared = getattr(model.get_submodule(module_name), attr)
        for key in keys[1:]:
            module_name, _, attr = key.rpartition(".")
            module = model.get_submodule(module_name)
            if attr in module._parameters:
                module._parameters[attr] = shared
            else:
                module._buffers[attr] = shared


def _read_weights(directory: Path, files: list[str], meta: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of the weight files (one, or the shards an index names); quantized weights
    (the description's ``quantization``) rebuilt from their parts."""
    st = _safetensors()
    state: dict[str, torch.Tensor] = {}
    header: dict[str, str] = {}
    for name in files:
        path = directory / name
        try:
            tensors = st.torch.load_file(str(path))
            with st.safe_open(str(path), framework="pt") as handle:
                header.update(handle.metadata() or {})
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise ValueError(f"cannot read {path}: {exc}") from exc
        # A tensor read at an odd offset of the file takes other (differently rounded) BLAS
        # kernels than one the model allocated: copy those, so a loaded model computes bit for bit
        # what the saved one computed.
        state.update({key: t.clone() if t.data_ptr() % 64 else t for key, t in tensors.items()})
    return read_quantized(state, header, meta, where=str(directory))


def load_compressed(
    directory: str | os.PathLike,
    base: nn.Module | None = None,
    *,
    inplace: bool = False,
    verify: bool = True,
) -> nn.Module:
    """Rebuild a compressed model saved by :func:`save_compressed`.

    Parameters
    ----------
    directory : path
    base : nn.Module or None
        A dense model of the original architecture (its weights are replaced), or None to
        build the architecture from the transformers config saved in the directory (without
        allocating dense weights). A directory of another kind of model needs ``base``; loading
        it by name, with its recorded source model, is :func:`svdkit.load_model`'s job.
    inplace : bool
        Rebuild inside ``base`` itself instead of a deep copy.
    verify : bool
        Check the weight files against the SHA-256 recorded at save time.

    Returns
    -------
    nn.Module
        In eval mode when built from the saved config; otherwise with ``base``'s mode.

    Raises
    ------
    FileNotFoundError
        A missing directory or file.
    ValueError
        An unknown format version, a corrupted description or weight file, a hash mismatch, or
        a layer or tensor that does not fit the base model. Nothing is modified then: ``base``
        is left exactly as it was.
    """
    directory = Path(directory)
    meta = read_description(directory)
    if verify:
        _verify_files(directory, meta)
    if base is None:
        if not (directory / "config.json").exists():
            source = meta.get("source")
            hint = f"svdkit.load_model({str(directory)!r}) rebuilds it on its recorded source {source!r}" if source else "pass base="
            raise ValueError(f"{directory} holds no transformers config to rebuild the model from: pass base= (a dense model), or {hint}")
        model = transformers_skeleton(directory)
        try:  # built without them when saved (e.g. a ViT without its pooler)
            drop_modules(model, meta.get("absent_modules") or [])
        except ValueError as exc:
            raise ValueError(f"{directory / CONFIG_NAME} does not belong to the config.json beside it: {exc}") from None
        built_here = True
    else:
        model = base if inplace else copy.deepcopy(base)
        built_here = False
    skeletons = _skeletons(model, meta["layers"], directory)
    expected, groups = _expected_state(model, skeletons)
    files = weight_files(meta)
    where = directory / (files[0] if len(files) == 1 else INDEX_NAME)
    state = _read_weights(directory, files, meta)
    for keys in groups:  # a shared tensor is saved under one of its names: give it to all of them
        present = next((k for k in keys if k in state), None)
        if present is not None:
            state.update({k: state[present] for k in keys})
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        details = [f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else "",
                   "shapes differ for " + ", ".join(f"{k} {tuple(state[k].shape)} vs {expected[k]}" for k in wrong[:5]) if wrong else ""]
        raise ValueError(f"{where} does not fit the model: " + "; ".join(d for d in details if d))
    # Everything is checked: only now is the model changed.
    for name, skeleton in skeletons.items():
        replace_module(model, name, skeleton)
    quantized = {key: state.pop(key) for key in list(state) if is_quantized(state[key])}
    model.load_state_dict(state, strict=False, assign=built_here)
    for key, tensor in quantized.items():
        module_name, _, attr = key.rpartition(".")
        setattr(model.get_submodule(module_name), attr, nn.Parameter(tensor, requires_grad=False))
    if built_here:
        _reshare(model, groups)
        still_empty = [name for name, p in model.named_parameters() if p.is_meta]
        if still_empty:
            raise ValueError(f"{where} left parameters without values: {still_empty[:5]}")
    guard_plain_save(model)
    return model


def decompress(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every factorized layer by its dense equivalent (``to_dense``)."""
    out = model if inplace else copy.deepcopy(model)
    for name, module in [(n, m) for n, m in out.named_modules() if isinstance(m, LowRankLayer)]:
        replace_module(out, name, module.to_dense())
    guard_plain_save(out)
    return out
