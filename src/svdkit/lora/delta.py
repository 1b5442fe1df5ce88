"""Weight changes between a base and a fine-tuned model, and their spectra.

How low-rank is a fine-tune? :func:`delta_spectrum` answers for one ``delta = W_ft - W_base``:
its singular values, the relative Frobenius error of its best rank-1/4/8/16/32 approximations,
the energy share of its top 10 singular values and the ranks that keep 90 % and 99 % of its
energy. :func:`analyze_deltas` does it for every layer of a model pair and returns a
:class:`svdkit.lora.DeltaReport` (``to_table()``, ``to_dict()``, ``to_json()``, ``to_pandas()``).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import nn

from ..layers.lora import LoRALayer, lora_kinds
from ..linalg import energy_rank, svdvals, tail_error
from ..progress import ProgressLike, track
from ..surgery import find_targets
from ..views import get_view, weight_matrix
from .report import DeltaReport, DeltaSpectrum

__all__ = ["analyze_deltas", "delta_spectrum", "weight_deltas"]

DEFAULT_RANKS = (1, 4, 8, 16, 32)


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
    target_modules: str | Iterable[str] | None = None,
    exclude_modules: str | Iterable[str] = (),
    dtype: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor]:
    """``W_finetuned - W_base`` for every selected layer, after checking the architectures match.

    Parameters
    ----------
    base_model, finetuned_model : nn.Module
        Two models of the same architecture.
    target_modules, exclude_modules
        PEFT-style selection (default: every Linear, Conv1D and Conv2d but the output head).
    dtype : torch.dtype
        Precision of the difference (float64 by default, so a float32 change is exact).

    Returns
    -------
    dict of name -> Tensor of shape (out, d)

    Raises
    ------
    ValueError
        If the models differ in type, in the layers selected, or in a layer's shape (the
        message names the first differences), or if a selected weight holds NaN/Inf (the
        message names the layer and the model).
    """
    if type(base_model) is not type(finetuned_model):
        raise ValueError(
            f"base and fine-tuned models have different architectures: "
            f"{type(base_model).__name__} vs {type(finetuned_model).__name__}"
        )
    for which, model in (("base", base_model), ("fine-tuned", finetuned_model)):
        if any(isinstance(m, LoRALayer) for m in model.modules()):
            raise ValueError(f"the {which} model has LoRA layers; merge_and_unload() it before comparing weights")
    spec = target_modules if target_modules is None or isinstance(target_modules, str) else tuple(target_modules)
    excl = exclude_modules if isinstance(exclude_modules, str) else tuple(exclude_modules)
    kinds = lora_kinds()
    base_layers = dict(find_targets(base_model, spec, exclude_modules=excl, kinds=kinds))
    ft_layers = dict(find_targets(finetuned_model, spec, exclude_modules=excl, kinds=kinds))
    only_base = sorted(set(base_layers) - set(ft_layers))
    only_ft = sorted(set(ft_layers) - set(base_layers))
    if only_base or only_ft:
        raise ValueError(
            "base and fine-tuned models have different architectures: "
            f"layers only in the base: {only_base[:5]}{' ...' if len(only_base) > 5 else ''}; "
            f"only in the fine-tuned model: {only_ft[:5]}{' ...' if len(only_ft) > 5 else ''}"
        )
    if not base_layers:
        raise ValueError(f"no Linear, Conv1D or Conv2d layer matches target_modules={target_modules!r}")
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
        for which, W in (("base", Wb), ("fine-tuned", Wf)):
            bad = int((~torch.isfinite(W)).sum())
            if bad:
                raise ValueError(f"layer {name!r}: the {which} model's weight holds {bad} non-finite value(s) (NaN/Inf)")
        deltas[name] = Wf.to(device=Wb.device, dtype=dtype) - Wb.to(dtype)
    return deltas


def analyze_deltas(
    base_model: nn.Module,
    finetuned_model: nn.Module,
    *,
    target_modules: str | Iterable[str] | None = None,
    exclude_modules: str | Iterable[str] = (),
    ranks: Sequence[int] = DEFAULT_RANKS,
    top: int = 10,
    progress: ProgressLike = False,
) -> DeltaReport:
    """:func:`delta_spectrum` of every layer's weight change, in model order.

    Parameters
    ----------
    base_model, finetuned_model : nn.Module
    target_modules, exclude_modules
        PEFT-style selection (see :func:`weight_deltas`).
    ranks, top
        See :func:`delta_spectrum`.
    progress : bool or callable
        Progress over the layers (:func:`svdkit.progress.track`).

    Returns
    -------
    DeltaReport
        One :class:`DeltaSpectrum` per layer; iterate it or call ``to_table()``.

    Raises
    ------
    ValueError
        If the architectures differ or a weight is not finite (see :func:`weight_deltas`).
    """
    deltas = weight_deltas(base_model, finetuned_model, target_modules=target_modules, exclude_modules=exclude_modules)
    out = []
    for name, delta in track(list(deltas.items()), progress, desc="weight-change spectra"):
        base_weight = weight_matrix(base_model.get_submodule(name))
        out.append(delta_spectrum(delta, ranks=ranks, top=top, name=name, base_weight=base_weight))
    return DeltaReport(tuple(out))
