"""Curvature estimates: the objectives whose gradients at each layer's output give the output
side of a method's metric (the ``fisher`` method and the global budget).

A curvature estimate maps one forward result (and its batch) to scalars; the pipelines run a
backward pass for each, and :class:`~svdkit.calibrate.GradientRecorder` adds the Gram of the
gradients at every target's output. Registered estimates:

==============  =================================================================
``"probes"``    ``z . f(x)`` for ``probes`` random Gaussian ``z`` on the model output
                (any model): the Gram of the gradients is ``J J^T``
``"labels"``    the summed negative log-likelihood of the true next tokens (causal
                LMs): the Gram of the gradients is the empirical Fisher
``"sampled"``   the same at ``probes`` next tokens (one by default) sampled from the
                model's own distribution at each position: the true Fisher
==============  =================================================================

``curvature="auto"`` takes the estimate registered as the default for the model: ``"labels"``
for causal language models, ``"probes"`` otherwise. Neither Fisher wins everywhere: on SmolLM2
the true Fisher gave lower perplexity on every held-out domain at 0.8 of the parameters (0.9-4.5 %,
three draws of the calibration windows), but higher on every domain at 0.7 (4-21 %, two draws) and
on seven of eight domain-draw pairs at 0.6 (up to 6 %); see ``docs/benchmarks.md``. Adding an
estimate is one function decorated with :func:`register_curvature`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..batches import output_tensor
from ..causal_lm import is_causal_lm

__all__ = ["CURVATURES", "Curvature", "objectives", "register_curvature", "resolve_curvature"]

ObjectiveFunction = Callable[[Any, Any, int, torch.Generator], Iterator[torch.Tensor]]


@dataclass(frozen=True)
class Curvature:
    """A registered curvature estimate.

    Attributes
    ----------
    name : str
    objectives : callable
        ``objectives(result, batch, probes, generator) -> iterator of scalars``.
    default_for_causal_lm, default_otherwise : bool
        Whether ``curvature="auto"`` picks it for causal language models, or for other models.
    next_token : bool
        It scores next tokens, so each calibration window needs at least two tokens.
    default_probes : int
        Objectives per batch (each a backward pass) when the config's ``probes`` is None.
    """

    name: str
    objectives: ObjectiveFunction
    default_for_causal_lm: bool = False
    default_otherwise: bool = False
    next_token: bool = False
    default_probes: int = 1

    def check_batches(self, batches: list[Any]) -> None:
        """Refuse, before any work, batches this estimate cannot use (windows of one token)."""
        if not self.next_token:
            return
        for index, batch in enumerate(batches):
            ids = _input_ids(batch)
            if ids is not None and ids.ndim == 2 and ids.shape[1] < 2:
                raise ValueError(
                    f"calibration batch {index} holds windows of {ids.shape[1]} token: curvature={self.name!r} scores the next "
                    "token of each position, and a one-token window has none (the curvature would be zero and the budget "
                    "meaningless); use windows of at least 2 tokens (--seq-len)"
                )


CURVATURES: dict[str, Curvature] = {}


def register_curvature(
    name: str, *, default_for_causal_lm: bool = False, default_otherwise: bool = False, next_token: bool = False,
    default_probes: int = 1,
) -> Callable[[ObjectiveFunction], ObjectiveFunction]:
    """Decorator adding ``fn(result, batch, probes, generator) -> iterator of scalars`` to
    :data:`CURVATURES` (see :class:`Curvature`)."""

    def decorate(fn: ObjectiveFunction) -> ObjectiveFunction:
        CURVATURES[name] = Curvature(name, fn, default_for_causal_lm, default_otherwise, next_token, default_probes)
        return fn

    return decorate


def resolve_curvature(name: str, model: nn.Module) -> str:
    """The registered estimate ``name`` stands for (``"auto"``: the default for ``model``)."""
    if name != "auto":
        return name
    causal = is_causal_lm(model)
    for entry in CURVATURES.values():
        if (entry.default_for_causal_lm if causal else entry.default_otherwise):
            return entry.name
    raise ValueError(f"no curvature estimate is registered as the default for {'causal' if causal else 'other'} models")


def objectives(name: str, result: Any, batch: Any, probes: int | None, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """The scalars of estimate ``name`` for one forward ``result`` of ``batch`` (``probes`` of
    them, or the estimate's default number when None)."""
    if name not in CURVATURES:
        raise ValueError(f"unknown curvature {name!r}; choose one of {sorted(CURVATURES)}")
    entry = CURVATURES[name]
    return entry.objectives(result, batch, probes or entry.default_probes, generator)


@register_curvature("probes", default_otherwise=True, default_probes=2)
def random_probes(result: Any, batch: Any, probes: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """``z . f(x)`` for ``probes`` Gaussian ``z`` of the model output's shape."""
    output = output_tensor(result)
    for _ in range(probes):
        z = torch.randn(output.shape, generator=generator, dtype=output.dtype).to(output.device)
        yield (output * z).sum()


@register_curvature("labels", default_for_causal_lm=True, next_token=True)
def next_token_labels(result: Any, batch: Any, probes: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """The summed negative log-likelihood of the true next tokens."""
    flat, ids, keep = _next_token_logits(result, batch, "labels")
    yield _nll(flat, ids[:, 1:].reshape(-1).to(flat.device), keep)


@register_curvature("sampled", next_token=True)
def sampled_tokens(result: Any, batch: Any, probes: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """The summed negative log-likelihood of ``probes`` next tokens sampled from the model."""
    flat, _, keep = _next_token_logits(result, batch, "sampled")
    probs = torch.softmax(flat.detach(), dim=-1).cpu()
    for _ in range(probes):
        targets = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(flat.device)
        yield _nll(flat, targets, keep)


def _input_ids(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor) and not batch.is_floating_point():
        return batch
    if isinstance(batch, dict) and isinstance(batch.get("input_ids"), torch.Tensor):
        return batch["input_ids"]
    return None


def _next_token_logits(result: Any, batch: Any, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The logits that predict each next token, flattened to (N, vocab) in float32, the ids, and
    the mask of the positions to keep (padding left out)."""
    logits = output_tensor(result)
    ids = _input_ids(batch)
    if ids is None or logits.ndim != 3 or tuple(logits.shape[:2]) != tuple(ids.shape):
        raise ValueError(
            f"curvature={name!r} needs a causal language model fed token ids: got outputs of shape "
            f"{tuple(logits.shape)} for a {type(batch).__name__} batch"
        )
    if ids.shape[1] < 2:
        raise ValueError(
            f"curvature={name!r} needs calibration windows of at least 2 tokens (a window of {ids.shape[1]} has no next "
            "token to predict, so the curvature would be zero): use longer windows (--seq-len)"
        )
    logits = logits[:, :-1].float()
    flat = logits.reshape(-1, logits.shape[-1])
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    keep = None if mask is None else mask[:, 1:].reshape(-1).bool().to(flat.device)
    return flat, ids, keep


def _nll(flat: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    if keep is not None:
        flat, targets = flat[keep], targets[keep]
    return torch.nn.functional.cross_entropy(flat, targets, reduction="sum")
