"""Weight changes between a base and a fine-tuned model, and their spectra.

How low-rank is a fine-tune? :func:`delta_spectrum` answers for one ``delta = W_ft - W_base``:
its singular values, the relative Frobenius error of its best rank-1/4/8/16/32 approximations,
the energy share of its top 10 singular values and the ranks that keep 90 % and 99 % of its
energy. :func:`analyze_deltas` does it for every layer of a model pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ..layers.lora import LoRALayer
from ..linalg import energy_rank, svdvals, tail_error
from ..surgery import find_targets
from ..views import get_view, weight_matrix

__all__ = [
    "DeltaSpectrum",
    "analyze_deltas",
    "delta_spectrum",
    "format_delta_table",
    "weight_deltas",
]

DEFAULT_RANKS = (1, 4, 8, 16, 32)


@dataclass(frozen=True)
class DeltaSpectrum:
    """The spectrum of one weight change and how well low ranks capture it.

    Attributes
    ----------
    name : str
    shape : (int, int)
        Shape (out, d) of the weight matrix.
    singular_values : tuple of float
        All singular values of ``delta``, descending.
    rank_errors : dict of int -> float
        ``||delta - [delta]_k||_F / ||delta||_F`` for each requested ``k`` (0 once ``k`` reaches
        the full rank).
    top : int
        How many leading singular values ``top_energy_share`` covers.
    top_energy_share : float
        ``sum_{i<=top} s_i**2 / sum s_i**2``.
    rank_90, rank_99 : int
        Smallest ranks keeping 90 % / 99 % of ``||delta||_F**2`` (0 for a zero change).
    delta_norm : float
        ``||delta||_F``.
    relative_change : float or None
        ``||delta||_F / ||W_base||_F`` when the base weight is known.
    """

    name: str
    shape: tuple[int, int]
    singular_values: tuple[float, ...] = field(repr=False)
    rank_errors: dict[int, float]
    top: int
    top_energy_share: float
    rank_90: int
    rank_99: int
    delta_norm: float
    relative_change: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (rank keys become strings)."""
        return {
            "name": self.name,
            "shape": list(self.shape),
            "singular_values": list(self.singular_values),
            "rank_errors": {str(k): v for k, v in self.rank_errors.items()},
            "top": self.top,
            "top_energy_share": self.top_energy_share,
            "rank_90": self.rank_90,
            "rank_99": self.rank_99,
            "delta_norm": self.delta_norm,
            "relative_change": self.relative_change,
        }


def delta_spectrum(
    delta: torch.Tensor,
    *,
    ranks: Sequence[int] = DEFAULT_RANKS,
    top: int = 10,
    name: str = "",
    base_weight: torch.Tensor | None = None,
) -> DeltaSpectrum:
    """Spectrum of a weight change and the error of its low-rank approximations.

    Parameters
    ----------
    delta : Tensor of shape (out, d)
        ``W_finetuned - W_base``.
    ranks : sequence of int
        Ranks whose relative approximation error to report (Eckart-Young, from the spectrum).
    top : int
        Number of leading singular values for ``top_energy_share``.
    name : str
        Label carried into the result.
    base_weight : Tensor of shape (out, d), optional
        For ``relative_change``.

    Returns
    -------
    DeltaSpectrum
    """
    if delta.ndim != 2:
        raise ValueError(f"delta must be a matrix, got shape {tuple(delta.shape)}")
    bad = [k for k in ranks if isinstance(k, bool) or not isinstance(k, int) or k < 1]
    if bad:
        raise ValueError(f"ranks must be ints >= 1, got {bad}")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be an int >= 1, got {top!r}")
    D = delta.detach().double()
    S = svdvals(D)
    power = S.square()
    total = float(power.sum())
    share = float(power[:top].sum()) / total if total > 0 else 1.0
    relative = None
    if base_weight is not None:
        base_norm = float(base_weight.detach().double().norm())
        relative = math.sqrt(total) / base_norm if base_norm > 0 else math.inf
    return DeltaSpectrum(
        name=name,
        shape=(int(D.shape[0]), int(D.shape[1])),
        singular_values=tuple(float(s) for s in S),
        rank_errors={int(k): float(tail_error(S, int(k))) for k in ranks},
        top=int(top),
        top_energy_share=share,
        rank_90=int(energy_rank(S, 0.90)),
        rank_99=int(energy_rank(S, 0.99)),
        delta_norm=math.sqrt(total),
        relative_change=relative,
    )


def _effective_weight(module: nn.Module) -> torch.Tensor:
    if isinstance(module, LoRALayer):
        raise ValueError("the model has LoRA layers; merge_and_unload() it before comparing weights")
    return weight_matrix(module).detach()


def weight_deltas(
    base_model: nn.Module,
    finetuned_model: nn.Module,
    *,
    targets: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] = (),
    dtype: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor]:
    """``W_finetuned - W_base`` for every selected layer, after checking the architectures match.

    Parameters
    ----------
    base_model, finetuned_model : nn.Module
        Two models of the same architecture.
    targets, exclude
        PEFT-style selection (default: every Linear, Conv1D and Conv2d but the output head).
    dtype : torch.dtype
        Precision of the difference (float64 by default, so a float32 change is exact).

    Returns
    -------
    dict of name -> Tensor of shape (out, d)

    Raises
    ------
    ValueError
        If the models differ in type, in the layers selected, or in a layer's shape; the
        message names the first differences.
    """
    if type(base_model) is not type(finetuned_model):
        raise ValueError(
            f"base and fine-tuned models have different architectures: "
            f"{type(base_model).__name__} vs {type(finetuned_model).__name__}"
        )
    for which, model in (("base", base_model), ("fine-tuned", finetuned_model)):
        if any(isinstance(m, LoRALayer) for m in model.modules()):
            raise ValueError(f"the {which} model has LoRA layers; merge_and_unload() it before comparing weights")
    spec = targets if targets is None or isinstance(targets, str) else tuple(targets)
    excl = exclude if isinstance(exclude, str) else tuple(exclude)
    kinds = ("linear", "conv1d", "conv2d")
    base_layers = dict(find_targets(base_model, spec, exclude=excl, kinds=kinds))
    ft_layers = dict(find_targets(finetuned_model, spec, exclude=excl, kinds=kinds))
    only_base = sorted(set(base_layers) - set(ft_layers))
    only_ft = sorted(set(ft_layers) - set(base_layers))
    if only_base or only_ft:
        raise ValueError(
            "base and fine-tuned models have different architectures: "
            f"layers only in the base: {only_base[:5]}{' ...' if len(only_base) > 5 else ''}; "
            f"only in the fine-tuned model: {only_ft[:5]}{' ...' if len(only_ft) > 5 else ''}"
        )
    if not base_layers:
        raise ValueError(f"no Linear, Conv1D or Conv2d layer matches targets={targets!r}")
    deltas: dict[str, torch.Tensor] = {}
    for name, base in base_layers.items():
        ft = ft_layers[name]
        kb, kf = get_view(base).kind, get_view(ft).kind
        Wb, Wf = _effective_weight(base), _effective_weight(ft)
        if kb != kf or Wb.shape != Wf.shape:
            raise ValueError(
                f"base and fine-tuned models have different architectures: layer {name!r} is a "
                f"{kb} {tuple(Wb.shape)} in the base and a {kf} {tuple(Wf.shape)} in the fine-tuned model"
            )
        deltas[name] = Wf.to(device=Wb.device, dtype=dtype) - Wb.to(dtype)
    return deltas


def analyze_deltas(
    base_model: nn.Module,
    finetuned_model: nn.Module,
    *,
    targets: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] = (),
    ranks: Sequence[int] = DEFAULT_RANKS,
    top: int = 10,
) -> list[DeltaSpectrum]:
    """:func:`delta_spectrum` of every layer's weight change, in model order.

    Raises
    ------
    ValueError
        If the architectures differ (see :func:`weight_deltas`).
    """
    deltas = weight_deltas(base_model, finetuned_model, targets=targets, exclude=exclude)
    out = []
    for name, delta in deltas.items():
        base_weight = weight_matrix(base_model.get_submodule(name))
        out.append(delta_spectrum(delta, ranks=ranks, top=top, name=name, base_weight=base_weight))
    return out


def format_delta_table(spectra: Sequence[DeltaSpectrum]) -> str:
    """A plain-text table: one row per layer with its shape, ``||dW||/||W||``, the relative error at
    each rank, the top-``k`` energy share and the ranks for 90 % / 99 % of the energy."""
    if not spectra:
        return "(no layers)"
    ranks = list(spectra[0].rank_errors)
    top = spectra[0].top
    header = ["layer", "shape", "|dW|/|W|"] + [f"err@{k}" for k in ranks] + [f"top{top} E", "r90", "r99"]
    rows = []
    for s in spectra:
        rel = "-" if s.relative_change is None else f"{s.relative_change:.3g}"
        rows.append(
            [s.name, f"{s.shape[0]}x{s.shape[1]}", rel]
            + [f"{s.rank_errors[k]:.3f}" for k in ranks]
            + [f"{100 * s.top_energy_share:.1f}%", str(s.rank_90), str(s.rank_99)]
        )
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)
