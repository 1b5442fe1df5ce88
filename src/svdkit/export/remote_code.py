"""A compressed transformers model saved so that plain transformers loads it (remote code).

The field's pattern (ASVD, ZS-SVD, LowRankArena's checkpoints): ``config.json`` keeps the base
architecture's fields, adds the low-rank layers and their ranks, and names in ``auto_map`` a
config class and model classes that a modeling file in the directory defines. Here that file is
:mod:`svdkit.export.modeling_lowrank` (torch and transformers only) plus a tail that subclasses the
model's own transformers classes, so that

    AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)
    AutoModel.from_pretrained(directory, trust_remote_code=True)   # the base model (vLLM)

give the compressed model without svdkit installed. The config's ``model_type`` is
``svdkit_<base model type>``, which transformers does not know: loading without
``trust_remote_code`` is transformers' error asking for it, never a dense model with random
weights. svdkit reads such a ``config.json`` back into the base config (:func:`base_config`), so
its own loader needs no remote code.

:func:`export_blocker` says why a model cannot be written this way (it is not a transformers
model, or it holds a factorized layer that is not a ``LowRankLinear``); the check that decides is
structural: the modeling code, run on the saved config, must build a model with exactly the
tensors of the saved files (names and shapes; a tied tensor saved once).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .. import __version__

__all__ = [
    "CONFIG_KEY",
    "MODELING_FILE",
    "base_config",
    "base_config_dict",
    "export_blocker",
    "export_config_dict",
    "is_export_config",
    "modeling_source",
    "write_remote_code",
]

MODELING_FILE = "modeling_svdkit.py"
CONFIG_KEY = "svdkit"  # modeling_lowrank.CONFIG_KEY: that file cannot import svdkit, and this one imports transformers lazily
MODEL_TYPE_PREFIX = "svdkit_"
# transformers' Auto classes, by the table (in transformers.models.auto.modeling_auto) that maps a
# model type to the class each builds; the first that maps a model's class names it in auto_map.
AUTO_TABLES = {
    "AutoModelForCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "AutoModelForMaskedLM": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "AutoModelForSequenceClassification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForTokenClassification": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "AutoModel": "MODEL_MAPPING_NAMES",
}


def _transformers():
    try:
        import transformers
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    return transformers


def _auto_class(model_type: str, class_name: str) -> str | None:
    from transformers.models.auto import modeling_auto

    for auto, table in AUTO_TABLES.items():
        mapped = getattr(modeling_auto, table, {}).get(model_type)
        if mapped == class_name or (isinstance(mapped, (list, tuple)) and class_name in mapped):
            return auto
    return None


def _classes(model: nn.Module) -> dict[str, type]:
    """auto class -> transformers class: the model's own and, for a model with a head, its base model's."""
    model_type = model.config.model_type
    classes = {}
    for cls in dict.fromkeys((type(model), type(getattr(model, "base_model", model)))):
        auto = _auto_class(model_type, cls.__name__)
        if auto is None:
            raise ValueError(f"no transformers Auto class builds {cls.__name__} for model type {model_type!r}")
        classes[auto] = cls
    return classes


def export_blocker(model: nn.Module, layers: Mapping[str, Any]) -> str | None:
    """Why ``model`` cannot be saved for plain transformers, or None if it can.

    Parameters
    ----------
    model : nn.Module
    layers : mapping of str -> dict
        Its factorized layers, as :func:`svdkit.compression.io.factorized_layers` describes them.
    """
    transformers = _transformers()
    if transformers is None:
        return "transformers is not installed"
    if not isinstance(model, transformers.PreTrainedModel):
        return f"the model is a {type(model).__name__}, not a transformers PreTrainedModel"
    for name, spec in layers.items():
        spec = spec if isinstance(spec, Mapping) else {}
        other = spec.get("same_as") or spec.get("shares_factors_with") or ", ".join((spec.get("shares_factor") or {}).values())
        if other:
            return f"layers {other} and {name} share their factors, which the modeling code cannot express"
        if spec.get("type") not in ("LowRankLinear", "ExpertBank"):
            return (f"layer {name} is factorized as {spec.get('type')}; the modeling code expresses LowRankLinear (nn.Linear, "
                    "Conv1D) and a mixture's experts one per module (ExpertBank) only")
    for cls in (type(model), type(model.base_model), type(model.config)):
        if getattr(transformers, cls.__name__, None) is not cls:
            return f"{cls.__name__} is not a class of transformers' public API"
    try:
        _classes(model)
    except ValueError as exc:
        return str(exc)
    return None


def _prefix(model: nn.Module) -> str:
    """Where the base model sits in ``model`` ("" when ``model`` is the base model)."""
    return model.base_model_prefix if getattr(model, "base_model", model) is not model else ""


def export_config_dict(base: Mapping[str, Any], model: nn.Module, layers: Mapping[str, Any], dtype: str | None,
                       absent_modules: Sequence[str] = ()) -> dict[str, Any]:
    """``config.json`` of the export, from the base model's ``config.json`` (``base``).

    The base fields are kept; ``model_type`` becomes ``svdkit_<type>``, ``architectures`` and
    ``auto_map`` name the modeling file's classes, ``dtype`` (and ``torch_dtype``, its older
    name) is the saved weights' dtype, and ``svdkit`` holds the base type and classes and the
    low-rank layers: ``low_rank`` (name -> rank, names of ``model``), ``base_model_prefix``, and
    ``absent_modules``, the modules the class builds that ``model`` was built without.
    """
    import transformers

    out = dict(base)
    classes = _classes(model)
    out["model_type"] = MODEL_TYPE_PREFIX + base["model_type"]
    out["architectures"] = ["Svdkit" + type(model).__name__]
    out["auto_map"] = {auto: f"{Path(MODELING_FILE).stem}.Svdkit{cls.__name__}" for auto, cls in classes.items()}
    out["auto_map"]["AutoConfig"] = f"{Path(MODELING_FILE).stem}.Svdkit{type(model.config).__name__}"
    if dtype is not None:
        out["dtype"] = out["torch_dtype"] = dtype
    out[CONFIG_KEY] = {
        "base_model_type": base["model_type"],
        "base_architectures": base.get("architectures"),
        "base_model_prefix": _prefix(model),
        "low_rank": {name: int(spec["rank"]) for name, spec in layers.items() if spec.get("type") == "LowRankLinear"},
        "expert_banks": [name for name, spec in layers.items() if spec.get("type") == "ExpertBank"],
        "absent_modules": list(absent_modules),
        "svdkit_version": __version__,
        "transformers_version": transformers.__version__,
    }
    return out


def modeling_source(model: nn.Module) -> str:
    """The modeling file: :mod:`svdkit.export.modeling_lowrank` and the classes of ``model``."""
    import transformers

    template = (Path(__file__).parent / "modeling_lowrank.py").read_text(encoding="utf-8")
    config_class = type(model.config).__name__
    lines = [
        "",
        "",
        "# " + "-" * 98,
        f"# Written by svdkit {__version__} with transformers {transformers.__version__} for {type(model).__name__}:",
        "# the base classes, with their listed layers made low-rank.",
        "",
        f"TRANSFORMERS_VERSION = {transformers.__version__!r}",
        "",
        "",
        f"class Svdkit{config_class}(base_class({config_class!r}, TRANSFORMERS_VERSION)):",
        f"    model_type = {MODEL_TYPE_PREFIX + model.config.model_type!r}",
    ]
    for cls in reversed(list(_classes(model).values())):  # the base model first
        lines += [
            "",
            "",
            f"class Svdkit{cls.__name__}(LowRankModelMixin, base_class({cls.__name__!r}, TRANSFORMERS_VERSION)):",
            f"    config_class = Svdkit{config_class}",
        ]
    return template + "\n".join(lines) + "\n"


def is_export_config(config: Mapping[str, Any]) -> bool:
    """Whether a ``config.json`` dict is one that :func:`write_remote_code` wrote."""
    settings = config.get(CONFIG_KEY)
    return isinstance(settings, Mapping) and "base_model_type" in settings and str(config.get("model_type", "")).startswith(MODEL_TYPE_PREFIX)


def base_config_dict(config: Mapping[str, Any]) -> dict[str, Any]:
    """The base model's ``config.json`` dict back from an export's (see :func:`export_config_dict`);
    svdkit reads quantized weights itself, so transformers' ``quantization_config`` is left out."""
    settings = config[CONFIG_KEY]
    out = {key: value for key, value in config.items() if key not in ("auto_map", CONFIG_KEY, "quantization_config")}
    out["model_type"] = settings["base_model_type"]
    out["architectures"] = settings.get("base_architectures")
    return out


def base_config(directory: str | Path) -> Any:
    """The base transformers config of an export directory, or None for any other ``config.json``.

    No remote code runs: the config is built by the base model type's own class.

    Raises
    ------
    ValueError
        An unreadable ``config.json``, or a base model type this transformers does not know.
    """
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if not isinstance(config, dict) or not is_export_config(config):
        return None
    import transformers

    fields = base_config_dict(config)
    model_type = fields.pop("model_type")
    try:
        return transformers.AutoConfig.for_model(model_type, **fields)
    except ValueError as exc:
        raise ValueError(
            f"{path} is a compressed {model_type!r} model, which transformers {transformers.__version__} does not know "
            f"(it was written with transformers {config[CONFIG_KEY].get('transformers_version')}): {exc}"
        ) from exc


def saved_shapes(files: Sequence[Path], quantized: Mapping[str, Sequence[int]] | None = None) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in safetensors files, read from their headers; a quantized tensor
    (``quantized``: name -> its shape) stands for its parts (``<module>._<name>_<part>``)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            shapes.update({key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()})
    for key, shape in (quantized or {}).items():
        module, _, name = key.rpartition(".")
        prefix = f"{module}._{name}_" if module else f"_{name}_"
        for part in [k for k in shapes if k.startswith(prefix)]:
            del shapes[part]
        shapes[key] = tuple(shape)
    return shapes


def _structure_mismatch(cls: type, config: Any, saved: Mapping[str, tuple[int, ...]]) -> str | None:
    """Build ``cls`` as the modeling file does (its listed layers made low-rank in ``post_init``),
    on the meta device, and compare its tensors with the saved ones. A tensor the build ties to
    one that is saved (tied embeddings, saved once) need not be saved itself."""
    from .modeling_lowrank import LowRankModelMixin

    probe = type(f"Svdkit{cls.__name__}", (LowRankModelMixin, cls), {})
    try:
        with torch.device("meta"):
            built = probe(copy.deepcopy(config)).state_dict(keep_vars=True)
    except ValueError as exc:  # a listed layer the architecture does not have (a model changed by hand)
        return f"the modeling code cannot build {cls.__name__} from the saved config: {exc}"
    present = {id(built[key]) for key in saved if key in built}
    missing = sorted(key for key, tensor in built.items() if key not in saved and id(tensor) not in present)
    extra = sorted(set(saved) - set(built))
    shapes = sorted(key for key in set(saved) & set(built) if tuple(built[key].shape) != tuple(saved[key]))
    if not (missing or extra or shapes):
        return None
    details = [f"{what} {keys[:3]}" for what, keys in (("missing", missing), ("unexpected", extra), ("other shapes of", shapes)) if keys]
    return f"the modeling code would build {cls.__name__} with other tensors than the saved ones: {'; '.join(details)}"


def write_remote_code(model: nn.Module, directory: Path, layers: Mapping[str, Any], dtype: str | None,
                      weight_files: Sequence[str], quantization: Mapping[str, Any] | None = None,
                      absent_modules: Sequence[str] = ()) -> str | None:
    """Turn the base ``config.json`` in ``directory`` into the export's and write the modeling file.

    Parameters
    ----------
    model : nn.Module
        The compressed model; only its classes and config are read (a streamed model's blocks
        may be empty or still dense in memory).
    directory : Path
        Holds the base ``config.json`` and the weight files.
    layers : mapping
        The factorized layers, as the description records them.
    dtype : str or None
        The saved weights' dtype.
    weight_files : sequence of str
        The weight files in ``directory``: the modeling code must build exactly their tensors.
    quantization : mapping, optional
        The quantized weights' record: transformers reads them through the ``quantization_config``
        written into ``config.json`` (``TorchAoConfig``), for a mode it can load.
    absent_modules : sequence of str
        Modules the model's class builds that ``model`` was built without (left out on loading).

    Returns
    -------
    str or None
        Why plain transformers cannot load the model (nothing is written then), or None.
    """
    reason = export_blocker(model, layers)
    if reason is not None:
        return reason
    quantization_config = None
    if quantization:
        from ..quantization.record import transformers_quantization_config

        try:
            quantization_config = transformers_quantization_config(quantization)
        except ValueError as exc:
            return f"its weights are quantized in {quantization.get('mode')}: {exc}"
    path = directory / "config.json"
    exported = export_config_dict(json.loads(path.read_text(encoding="utf-8")), model, layers, dtype, absent_modules)
    import transformers

    fields = base_config_dict(exported)
    config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    setattr(config, CONFIG_KEY, exported[CONFIG_KEY])
    quantized = {key: entry["shape"] for key, entry in (quantization or {}).get("tensors", {}).items()}
    reason = _structure_mismatch(type(model), config, saved_shapes([directory / name for name in weight_files], quantized))
    if reason is not None:
        return reason
    if quantization_config is not None:
        exported["quantization_config"] = quantization_config
    path.write_text(json.dumps(exported, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (directory / MODELING_FILE).write_text(modeling_source(model), encoding="utf-8")
    return None
