"""LoRA wrappers: a frozen base layer plus a trainable low-rank update ``s * B @ A``.

A wrapper keeps the module it wraps as ``base_layer`` (never replaced, never re-created) and adds
two small modules named like PEFT's, so adapter state dicts map onto PEFT's keys one to one:

==============================  ================================  =================================
base layer                      ``lora_A``                        ``lora_B``
==============================  ================================  =================================
``nn.Linear`` (out, in)         Linear, weight (r, in)            Linear, weight (out, r)
transformers ``Conv1D``         Linear, weight (r, in)            Linear, weight (out, r)
``nn.Conv2d``                   Conv2d, weight (r, C_in, kh, kw)  Conv2d 1x1, weight (C_out, r, 1, 1)
==============================  ================================  =================================

Seen as matrices through :func:`svdkit.views.weight_matrix`, every wrapper adds
``delta = s * B @ A`` of shape (out, d) to the base matrix, with ``s = alpha / r`` (or
``alpha / sqrt(r)`` with rsLoRA). Merging writes ``W + delta`` into the base weight, computed in
float32 (float64 for float64 weights) and cast back to the weight's dtype.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from ..views import get_view, set_weight_matrix, weight_matrix

__all__ = [
    "LoRAConv1D",
    "LoRAConv2d",
    "LoRALayer",
    "LoRALinear",
    "is_lora_layer",
    "lora_wrapper_class",
    "wrap_lora",
]

_HALF = (torch.float16, torch.bfloat16)


def _check_rank_alpha(rank: object, alpha: object, dropout: object) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class LoRALayer(nn.Module):
    """Base class of the LoRA wrappers: ``y = base_layer(x) + s * B(A(dropout(x)))``.

    Parameters
    ----------
    base_layer : nn.Module
        The layer to adapt. It is kept as is (same object) under ``self.base_layer``.
    rank : int
        ``r``, at most the smaller side of the base layer's weight matrix.
    alpha : float
        Scaling numerator, ``> 0``: ``s = alpha / r`` (``alpha / sqrt(r)`` if ``use_rslora``).
    dropout : float
        Dropout probability on the adapter's input, in ``[0, 1)``.
    use_rslora : bool
        Rank-stabilised scaling ``alpha / sqrt(r)``.

    Attributes
    ----------
    lora_A, lora_B : nn.Module
        The adapter factors (see the module docstring for their shapes). Both start at zero: an
        init from :mod:`svdkit.lora.inits` fills them.
    lora_A_init, lora_B_init : Tensor or None
        Buffers set by the inits that move part of the base weight into the adapter (PiSSA,
        MiLoRA): the base weight it was built from is ``base + s * B_init @ A_init``. None otherwise.
    merged : bool
        Whether ``delta`` is currently added into the base weight.

    Notes
    -----
    Adapters live on the base weight's device, in its dtype, except that float16/bfloat16 bases get
    float32 adapters (the input is cast for the adapter path and the result cast back).
    """

    kind: ClassVar[str] = ""

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, *, dropout: float = 0.0, use_rslora: bool = False) -> None:
        super().__init__()
        _check_rank_alpha(rank, alpha, dropout)
        view = get_view(base_layer)
        if view is None or view.kind != self.kind:
            raise TypeError(f"{type(self).__name__} wraps a {self.kind} layer, got {type(base_layer).__name__}")
        self._check_base(base_layer)
        out_features, in_features = weight_matrix(base_layer).shape
        if rank > min(out_features, in_features):
            raise ValueError(
                f"rank {rank} exceeds min(out, in) = {min(out_features, in_features)} "
                f"of the {type(base_layer).__name__}'s {out_features}x{in_features} weight matrix"
            )
        self.base_layer = base_layer
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.use_rslora = bool(use_rslora)
        self.dropout_p = float(dropout)
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        weight = base_layer.weight
        dtype = torch.float32 if weight.dtype in _HALF else weight.dtype
        self.lora_A, self.lora_B = self._make_adapters(base_layer, rank)
        self.lora_A.to(device=weight.device, dtype=dtype)
        self.lora_B.to(device=weight.device, dtype=dtype)
        with torch.no_grad():
            self.lora_A.weight.zero_()
            self.lora_B.weight.zero_()
        self.register_buffer("lora_A_init", None)
        self.register_buffer("lora_B_init", None)
        self.merged = False

    # -- subclass hooks ---------------------------------------------------------------------
    def _check_base(self, base_layer: nn.Module) -> None:
        """Raise for base-layer configurations the wrapper cannot express."""

    def _make_adapters(self, base_layer: nn.Module, rank: int) -> tuple[nn.Module, nn.Module]:
        raise NotImplementedError

    # -- shapes and factors -----------------------------------------------------------------
    @property
    def scaling(self) -> float:
        """``s = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """Shape (out, d) of the base layer's weight matrix (:func:`svdkit.views.weight_matrix`)."""
        return tuple(weight_matrix(self.base_layer).shape)  # type: ignore[return-value]

    @property
    def moved_weight(self) -> bool:
        """True when an init moved part of the base weight into the adapter (PiSSA, MiLoRA)."""
        return self.lora_A_init is not None

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter factors as matrices.

        Returns
        -------
        A : Tensor of shape (rank, d)
        B : Tensor of shape (out, rank)
            Views of the parameters, so ``s * B @ A`` is the update of the weight matrix.
        """
        return self.lora_A.weight.reshape(self.rank, -1), self.lora_B.weight.reshape(-1, self.rank)

    def set_factors(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """Copy matrices into the adapter parameters (cast to the adapter's dtype).

        Parameters
        ----------
        A : Tensor of shape (rank, d)
        B : Tensor of shape (out, rank)
        """
        out_features, d = self.matrix_shape
        if tuple(A.shape) != (self.rank, d) or tuple(B.shape) != (out_features, self.rank):
            raise ValueError(
                f"factors for a rank-{self.rank} adapter of a {out_features}x{d} matrix must be A "
                f"({self.rank}, {d}) and B ({out_features}, {self.rank}); got {tuple(A.shape)} and {tuple(B.shape)}"
            )
        with torch.no_grad():
            self.lora_A.weight.copy_(A.reshape(self.lora_A.weight.shape))
            self.lora_B.weight.copy_(B.reshape(self.lora_B.weight.shape))

    def delta_weight(self) -> torch.Tensor:
        """The update ``s * B @ A``, Tensor of shape (out, d) in float32 (float64 for float64 adapters)."""
        A, B = self.factors()
        dtype = _compute_dtype(A.dtype)
        return (B.detach().to(dtype) @ A.detach().to(dtype)) * self.scaling

    # -- forward and merging ----------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        adapter_dtype = self.lora_A.weight.dtype
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(adapter_dtype))))
        return result + (update * self.scaling).to(result.dtype)

    def _add_to_base(self, sign: float, A: torch.Tensor, B: torch.Tensor, *, safe: bool, what: str) -> None:
        """``W <- W + sign * s * B @ A`` computed in float32/float64 and written back in W's dtype."""
        W = weight_matrix(self.base_layer)
        dtype = _compute_dtype(W.dtype)
        weight = self.base_layer.weight
        with torch.no_grad():
            A_, B_ = A.detach().to(W.device, dtype), B.detach().to(W.device, dtype)
            in_place = W.dtype == dtype and not safe and W.data_ptr() == weight.data_ptr()
            if in_place:
                W.addmm_(B_, A_, alpha=sign * self.scaling)
                return
            new = W.to(dtype).addmm(B_, A_, alpha=sign * self.scaling)
            if safe:
                bad = ~torch.isfinite(new)
                if bool(bad.any()):
                    raise ValueError(
                        f"{what} would write {int(bad.sum())} non-finite value(s) into the "
                        f"{type(self.base_layer).__name__} weight; the base weight was left unchanged"
                    )
                cast = new.to(W.dtype)
                if not bool(torch.isfinite(cast).all()):
                    raise ValueError(
                        f"{what} overflows {W.dtype} for the {type(self.base_layer).__name__} weight; "
                        "the base weight was left unchanged"
                    )
            set_weight_matrix(self.base_layer, new)

    def merge(self, *, safe: bool = False) -> None:
        """Add ``s * B @ A`` into the base weight (in float32, cast back); no-op if merged.

        Parameters
        ----------
        safe : bool
            Compute the merged weight out of place and raise ``ValueError`` (leaving the base
            untouched) if it holds NaN/Inf.
        """
        if self.merged:
            return
        A, B = self.factors()
        self._add_to_base(1.0, A, B, safe=safe, what="merging the adapter")
        self.merged = True

    def unmerge(self) -> None:
        """Subtract ``s * B @ A`` from the base weight again; no-op if not merged."""
        if not self.merged:
            return
        A, B = self.factors()
        self._add_to_base(-1.0, A, B, safe=False, what="unmerging the adapter")
        self.merged = False

    def merge_and_unload(self, *, safe: bool = False) -> nn.Module:
        """Merge, then return the base layer (which now holds ``W + s * B @ A``)."""
        self.merge(safe=safe)
        return self.base_layer

    def move_into_adapter(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """Set the factors and subtract ``s * B @ A`` from the base weight (PiSSA-style inits).

        The residual ``W - s * B @ A`` is computed from the factors as stored (after the cast to
        the adapter dtype), so ``base + adapter`` reproduces ``W`` up to float32 rounding however
        approximate the decomposition that produced ``A`` and ``B`` was. The stored factors are
        kept in ``lora_A_init`` / ``lora_B_init``.

        Parameters
        ----------
        A : Tensor of shape (rank, d)
        B : Tensor of shape (out, rank)
        """
        if self.merged:
            raise RuntimeError("unmerge the adapter before re-initialising it")
        if self.moved_weight:
            raise RuntimeError("this adapter already moved part of the base weight; wrap a fresh layer instead")
        self.set_factors(A, B)
        A_, B_ = self.factors()
        self._add_to_base(-1.0, A_, B_, safe=False, what="moving the principal part into the adapter")
        self.lora_A_init = A_.detach().clone()
        self.lora_B_init = B_.detach().clone()

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:.4g}, dropout={self.dropout_p:g}"
            + (", rslora" if self.use_rslora else "")
            + (", moved_weight" if self.moved_weight else "")
            + (", merged" if self.merged else "")
        )


class LoRALinear(LoRALayer):
    """LoRA on an ``nn.Linear``: ``A`` is (r, in), ``B`` is (out, r). See :class:`LoRALayer`."""

    kind = "linear"

    def _make_adapters(self, base_layer: nn.Module, rank: int) -> tuple[nn.Module, nn.Module]:
        out_features, in_features = weight_matrix(base_layer).shape
        return nn.Linear(in_features, rank, bias=False), nn.Linear(rank, out_features, bias=False)


class LoRAConv1D(LoRALinear):
    """LoRA on transformers' ``Conv1D`` (weight stored in x out); the factors are those of
    :class:`LoRALinear` on the (out, in) matrix, as PEFT does with ``fan_in_fan_out=True``."""

    kind = "conv1d"


class LoRAConv2d(LoRALayer):
    """LoRA on an ``nn.Conv2d`` (``groups == 1``), PEFT's layout.

    ``A`` is a Conv2d with the base kernel, stride, padding and dilation, weight (r, C_in, kh, kw);
    ``B`` is a 1x1 Conv2d, weight (C_out, r, 1, 1). As matrices they factor the (C_out, C_in*kh*kw)
    view of the kernel.
    """

    kind = "conv2d"

    def _check_base(self, base_layer: nn.Module) -> None:
        if base_layer.groups != 1:
            raise ValueError(f"LoRA on a grouped Conv2d (groups={base_layer.groups}) is not supported")

    def _make_adapters(self, base_layer: nn.Module, rank: int) -> tuple[nn.Module, nn.Module]:
        conv: nn.Conv2d = base_layer  # type: ignore[assignment]
        A = nn.Conv2d(
            conv.in_channels, rank, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, bias=False, padding_mode=conv.padding_mode,
        )
        B = nn.Conv2d(rank, conv.out_channels, 1, bias=False)
        return A, B


_WRAPPERS: dict[str, type[LoRALayer]] = {cls.kind: cls for cls in (LoRALinear, LoRAConv1D, LoRAConv2d)}


def is_lora_layer(module: nn.Module) -> bool:
    """Whether ``module`` is one of svdkit's LoRA wrappers."""
    return isinstance(module, LoRALayer)


def lora_wrapper_class(module: nn.Module) -> type[LoRALayer]:
    """The wrapper class for a layer, looked up by its weight-view kind.

    Raises
    ------
    TypeError
        For layers without a LoRA wrapper (embeddings, unknown types).
    """
    view = get_view(module)
    if view is None or view.kind not in _WRAPPERS:
        kind = view.kind if view is not None else type(module).__name__
        raise TypeError(f"no LoRA wrapper for {type(module).__name__} ({kind}); supported: {', '.join(sorted(_WRAPPERS))}")
    return _WRAPPERS[view.kind]


def wrap_lora(module: nn.Module, rank: int, alpha: float, *, dropout: float = 0.0, use_rslora: bool = False) -> LoRALayer:
    """Wrap a Linear, Conv1D or Conv2d in its LoRA wrapper (adapter factors at zero).

    Parameters
    ----------
    module : nn.Module
    rank : int
    alpha : float
    dropout : float
    use_rslora : bool

    Returns
    -------
    LoRALayer
        Holds ``module`` itself as ``base_layer``.
    """
    return lora_wrapper_class(module)(module, rank, alpha, dropout=dropout, use_rslora=use_rslora)
