"""Extract LoRA adapters from a fine-tuned model: per layer, the truncated SVD of ``W_ft - W_base``."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Iterable, Literal

import torch
from torch import nn

from ..layers.lora import wrap_lora
from ..linalg import RankLike, RankSpec, energy_rank, randomized_svd, resolve_rank, svd, svdvals
from ..surgery import replace_module
from ..views import weight_matrix
from .delta import weight_deltas
from .model import mark_only_lora_trainable

__all__ = ["ExtractionReport", "LayerExtraction", "extract_lora"]


@dataclass(frozen=True)
class LayerExtraction:
    """What the adapter extracted for one layer keeps of its weight change.

    Attributes
    ----------
    name : str
    shape : (int, int)
        Shape (out, d) of the weight matrix.
    rank : int
    alpha : float
    energy_captured : float
        ``sum_{i<=rank} s_i**2 / ||delta||_F**2``.
    relative_error : float
        ``||delta - s B A||_F / ||delta||_F`` (= ``sqrt(1 - energy_captured)``).
    rank_90, rank_99 : int
        Ranks this layer would need to keep 90 % / 99 % of the energy of its change.
    delta_norm : float
        ``||delta||_F``.
    relative_change : float
        ``||delta||_F / ||W_base||_F``.
    """

    name: str
    shape: tuple[int, int]
    rank: int
    alpha: float
    energy_captured: float
    relative_error: float
    rank_90: int
    rank_99: int
    delta_norm: float
    relative_change: float


@dataclass(frozen=True)
class ExtractionReport:
    """Per-layer results of :func:`extract_lora`.

    Attributes
    ----------
    layers : tuple of LayerExtraction
        Layers that received an adapter, in model order.
    unchanged : tuple of str
        Selected layers whose weights did not change (no adapter was made for them).
    rank : int or dict
        The rank spec used (``RankSpec.to_dict()`` form for typed specs).
    svd : str
        ``"exact"`` or ``"randomized"``.
    """

    layers: tuple[LayerExtraction, ...]
    unchanged: tuple[str, ...]
    rank: Any
    svd: str

    @property
    def adapter_parameters(self) -> int:
        """Parameters of all adapters: ``sum rank * (out + d)``."""
        return sum(layer.rank * (layer.shape[0] + layer.shape[1]) for layer in self.layers)

    @property
    def energy_captured(self) -> float:
        """Energy of all weight changes kept by the adapters, ``sum captured / sum total``."""
        total = sum(layer.delta_norm**2 for layer in self.layers)
        kept = sum(layer.energy_captured * layer.delta_norm**2 for layer in self.layers)
        return kept / total if total > 0 else 1.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "rank": self.rank,
            "svd": self.svd,
            "energy_captured": self.energy_captured,
            "adapter_parameters": self.adapter_parameters,
            "unchanged": list(self.unchanged),
            "layers": [
                {**layer.__dict__, "shape": list(layer.shape)} for layer in self.layers
            ],
        }

    def format_table(self) -> str:
        """A plain-text table, one row per layer, and a summary line."""
        header = ["layer", "shape", "rank", "energy", "rel.err", "r90", "r99", "|dW|/|W|"]
        rows = [
            [
                layer.name, f"{layer.shape[0]}x{layer.shape[1]}", str(layer.rank),
                f"{100 * layer.energy_captured:.2f}%", f"{layer.relative_error:.3g}",
                str(layer.rank_90), str(layer.rank_99), f"{layer.relative_change:.3g}",
            ]
            for layer in self.layers
        ]
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
        fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
        lines = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
        lines.append(
            f"{len(self.layers)} adapters, {self.adapter_parameters:,} parameters, "
            f"{100 * self.energy_captured:.2f}% of the weight-change energy"
            + (f"; {len(self.unchanged)} unchanged layer(s) skipped" if self.unchanged else "")
        )
        return "\n".join(lines)


def _split(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    root = (S.clamp_min(0) / scaling).sqrt()
    return root.unsqueeze(-1) * Vh, U * root


def extract_lora(
    base_model: nn.Module,
    finetuned_model: nn.Module,
    rank: RankLike = 16,
    *,
    targets: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] = (),
    alpha: float | None = None,
    svd_method: Literal["exact", "randomized"] = "exact",
    seed: int = 0,
) -> tuple[nn.Module, ExtractionReport]:
    """LoRA adapters that reproduce a fine-tune: ``s B A = [W_ft - W_base]_r`` per layer.

    Parameters
    ----------
    base_model, finetuned_model : nn.Module
        Same architecture; neither is modified.
    rank : int, Energy or ErrorTol (or any RankSpec)
        An int is the rank of every adapter (it must not exceed a layer's ``min(out, d)``);
        ``Energy(0.9)`` keeps 90 % of each layer's change energy, ``ErrorTol(0.1)`` a relative
        error of at most 10 %.
    targets, exclude
        PEFT-style layer selection (default: every Linear, Conv1D and Conv2d but the output head).
    alpha : float or None
        Alpha of every adapter; None sets ``alpha = rank`` per layer (scaling 1).
    svd_method : {"exact", "randomized"}
        ``"exact"``: one float64 SVD per layer gives the factors and the report. ``"randomized"``
        (int ranks only): the factors come from :func:`svdkit.linalg.randomized_svd` and the
        report's ranks from float32 singular values; faster on large layers.
    seed : int
        Seed of the randomized SVD.

    Returns
    -------
    model : nn.Module
        A copy of ``base_model`` with adapters on every changed layer (only the adapters trainable).
    report : ExtractionReport

    Raises
    ------
    ValueError
        For models of different architectures, an int rank above a layer's ``min(out, d)``,
        ``alpha <= 0``, or a spectrum-based rank with ``svd_method="randomized"``.

    Notes
    -----
    The differences and decompositions run in float64, so a weight change of rank ``<= r`` is
    recovered to float32 precision.
    """
    if svd_method not in ("exact", "randomized"):
        raise ValueError(f"svd_method must be 'exact' or 'randomized', got {svd_method!r}")
    is_int = isinstance(rank, int) and not isinstance(rank, bool)
    if not is_int and not isinstance(rank, RankSpec):
        raise ValueError(f"rank must be an int or a rank spec such as Energy(0.9) or ErrorTol(0.1), got {rank!r}")
    if is_int and rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if not is_int and svd_method == "randomized":
        raise ValueError(f"rank={rank!r} needs each layer's full spectrum: use svd_method='exact'")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0):
        raise ValueError(f"alpha must be a finite number > 0 (or None for alpha = rank), got {alpha!r}")
    deltas = weight_deltas(base_model, finetuned_model, targets=targets, exclude=exclude)
    if is_int:
        too_small = [(n, tuple(d.shape)) for n, d in deltas.items() if rank > min(d.shape)]
        if too_small:
            name, shape = too_small[0]
            raise ValueError(
                f"rank {rank} exceeds min(out, in) = {min(shape)} of layer {name!r} ({shape[0]}x{shape[1]}); "
                f"{len(too_small)} layer(s) are too small: lower the rank, exclude them, or use Energy/ErrorTol"
            )

    plans, reports, unchanged = [], [], []
    for index, (name, delta) in enumerate(deltas.items()):
        total = float(delta.square().sum())
        if total == 0.0:
            unchanged.append(name)
            continue
        if svd_method == "exact":
            U, S, Vh = svd(delta)
            spectrum = S
            k = resolve_rank(S, rank, tuple(delta.shape))
            U, S_k, Vh = U[:, :k], S[:k], Vh[:k]
        else:
            k = int(rank)
            U, S_k, Vh = randomized_svd(delta, k, seed=(seed * 1_000_003 + index))
            spectrum = svdvals(delta.float()).double()
        kept = min(float(S_k.square().sum()) / total, 1.0)
        layer_alpha = float(alpha) if alpha is not None else float(k)
        A, B = _split(U, S_k, Vh, layer_alpha / k)
        base_norm = float(weight_matrix(base_model.get_submodule(name)).detach().double().norm())
        plans.append((name, k, layer_alpha, A, B))
        reports.append(
            LayerExtraction(
                name=name,
                shape=(int(delta.shape[0]), int(delta.shape[1])),
                rank=k,
                alpha=layer_alpha,
                energy_captured=kept,
                relative_error=math.sqrt(max(1.0 - kept, 0.0)),
                rank_90=int(energy_rank(spectrum, 0.90)),
                rank_99=int(energy_rank(spectrum, 0.99)),
                delta_norm=math.sqrt(total),
                relative_change=math.sqrt(total) / base_norm if base_norm > 0 else math.inf,
            )
        )
    if not plans:
        raise ValueError("the fine-tuned model's selected weights equal the base model's: nothing to extract")

    model = copy.deepcopy(base_model)
    for name, k, layer_alpha, A, B in plans:
        layer = wrap_lora(model.get_submodule(name), k, layer_alpha)
        layer.set_factors(A, B)
        replace_module(model, name, layer)
    mark_only_lora_trainable(model)
    spec = rank if is_int else rank.to_dict()  # type: ignore[union-attr]
    return model, ExtractionReport(tuple(reports), tuple(unchanged), spec, svd_method)

