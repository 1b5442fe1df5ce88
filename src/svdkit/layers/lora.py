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
``delta = s * B @ A`` of shape (out, d) to the base matrix, with ``s = lora_alpha / r`` (or
``lora_alpha / sqrt(r)`` with rsLoRA). Parameters carry PEFT's names (``r``, ``lora_alpha``,
``lora_dropout``). Merging writes ``W + delta`` into the base weight, computed in
float32 (float64 for float64 weights) and cast back to the weight's dtype.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from ..views import get_view, kinds, set_weight_matrix, view_of_kind, weight_matrix

__all__ = [
    "LoRAConv1D",
    "LoRAConv2d",
    "LoRALayer",
    "LoRALinear",
    "is_lora_layer",
    "lora_kinds",
    "lora_wrapper_class",
    "register_lora_wrapper",
    "wrap_lora",
]

_HALF = (torch.float16, torch.bfloat16)


def _check_rank_alpha(r: object, lora_alpha: object, lora_dropout: object) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r (the adapter rank) must be an int >= 1, got {r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha) or lora_alpha <= 0:
        raise ValueError(f"lora_alpha must be a finite number > 0, got {lora_alpha!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not 0 <= lora_dropout < 1:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class LoRALayer(nn.Module):
    """Base class of the LoRA wrappers: ``y = base_layer(x) + s * B(A(dropout(x)))``.

    Parameters
    ----------
    base_layer : nn.Module
        The layer to adapt. It is kept as is (same object) under ``self.base_layer``.
    r : int
        The adapter rank, at most the smaller side of the base layer's weight matrix.
    lora_alpha : float
        Scaling numerator, ``> 0``: ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` if
        ``use_rslora``).
    lora_dropout : float
        Dropout probability on the adapter's input, in ``[0, 1)``.
    use_rslora : bool
        Rank-stabilised scaling ``lora_alpha / sqrt(r)``.

    Attributes
    ----------
    rank : int
        The adapter rank ``r`` (named like every low-rank layer's rank).
    lora_alpha : float
        The scaling numerator.
    dropout_p : float
        The dropout probability (``lora_dropout`` is the dropout module, as in PEFT).
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

    A new wrapper takes the training mode of the layer it wraps, so an adapter added to a model
    in ``eval()`` mode applies no dropout until the model is put back in training mode.

    :meth:`factors` and :meth:`set_factors` use svdkit's factor order ``(left, right)``, which
    for LoRA is ``(B, A)``: the update is ``s * B @ A``.
    """

    kind: ClassVar[str] = ""

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float, *, lora_dropout: float = 0.0, use_rslora: bool = False) -> None:
        super().__init__()
        _check_rank_alpha(r, lora_alpha, lora_dropout)
        view = get_view(base_layer)
        if view is None or view.kind != self.kind:
            raise TypeError(f"{type(self).__name__} wraps a {self.kind} layer, got {type(base_layer).__name__}")
        self.check_base(base_layer)
        out_features, in_features = weight_matrix(base_layer).shape
        if r > min(out_features, in_features):
            raise ValueError(
                f"rank {r} exceeds min(out, in) = {min(out_features, in_features)} "
                f"of the {type(base_layer).__name__}'s {out_features}x{in_features} weight matrix"
            )
        self.base_layer = base_layer
        self.rank = int(r)
        self.lora_alpha = float(lora_alpha)
        self.use_rslora = bool(use_rslora)
        self.dropout_p = float(lora_dropout)
        self.lora_dropout: nn.Module = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        weight = base_layer.weight
        dtype = torch.float32 if weight.dtype in _HALF else weight.dtype
        self.lora_A, self.lora_B = self._make_adapters(base_layer, self.rank)
        self.lora_A.to(device=weight.device, dtype=dtype)
        self.lora_B.to(device=weight.device, dtype=dtype)
        with torch.no_grad():
            self.lora_A.weight.zero_()
            self.lora_B.weight.zero_()
        self.register_buffer("lora_A_init", None)
        self.register_buffer("lora_B_init", None)
        self.merged = False
        # A wrapper joins the model in the mode of the layer it replaces: an eval() model gets
        # eval wrappers (no adapter dropout), a training model training ones.
        self.train(base_layer.training)

    # -- subclass hooks ---------------------------------------------------------------------
    @classmethod
    def check_base(cls, base_layer: nn.Module) -> None:
        """Raise ``ValueError`` for base-layer configurations the wrapper cannot express
        (nothing is modified; callers validate a whole selection with it before wrapping any)."""

    def _make_adapters(self, base_layer: nn.Module, rank: int) -> tuple[nn.Module, nn.Module]:
        raise NotImplementedError(f"{type(self).__name__} must implement _make_adapters")  # pragma: no cover - abstract

    # -- shapes and factors -----------------------------------------------------------------
    @property
    def scaling(self) -> float:
        """``s = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """Shape (out, d) of the base layer's weight matrix (:func:`svdkit.views.weight_matrix`)."""
        return tuple(weight_matrix(self.base_layer).shape)  # type: ignore[return-value]

    @property
    def moved_weight(self) -> bool:
        """True when an init moved part of the base weight into the adapter (PiSSA, MiLoRA)."""
        return self.lora_A_init is not None

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter factors as matrices, ``(left, right) = (B, A)``.

        The order is that of every factorization in svdkit (``left @ right``, as the
        compression methods' factors): the update is ``s * left @ right``.

        Returns
        -------
        B : Tensor of shape (out, rank)
            The left factor, a view of ``lora_B``'s weight.
        A : Tensor of shape (rank, d)
            The right factor, a view of ``lora_A``'s weight.
        """
        return self.lora_B.weight.reshape(-1, self.rank), self.lora_A.weight.reshape(self.rank, -1)

    def set_factors(self, B: torch.Tensor, A: torch.Tensor) -> None:
        """Copy matrices into the adapter parameters (cast to the adapter's dtype).

        Parameters
        ----------
        B : Tensor of shape (out, rank)
            The left factor, for ``lora_B``.
        A : Tensor of shape (rank, d)
            The right factor, for ``lora_A``.
        """
        out_features, d = self.matrix_shape
        if tuple(B.shape) != (out_features, self.rank) or tuple(A.shape) != (self.rank, d):
            raise ValueError(
                f"factors for a rank-{self.rank} adapter of a {out_features}x{d} matrix must be B "
                f"({out_features}, {self.rank}) and A ({self.rank}, {d}); got {tuple(B.shape)} and {tuple(A.shape)}"
            )
        with torch.no_grad():
            self.lora_B.weight.copy_(B.reshape(self.lora_B.weight.shape))
            self.lora_A.weight.copy_(A.reshape(self.lora_A.weight.shape))

    def delta_weight(self) -> torch.Tensor:
        """The update ``s * B @ A``, Tensor of shape (out, d) in float32 (float64 for float64 adapters)."""
        B, A = self.factors()
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

    def _updated_weight(self, sign: float, B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """``W + sign * s * B @ A`` out of place, in float32 (float64 for float64 weights)."""
        W = weight_matrix(self.base_layer)
        dtype = _compute_dtype(W.dtype)
        B_, A_ = B.detach().to(W.device, dtype), A.detach().to(W.device, dtype)
        return W.detach().to(dtype).addmm(B_, A_, alpha=sign * self.scaling)

    def _weight_problem(self, new: torch.Tensor, what: str) -> str | None:
        """Why writing ``new`` into the base weight would damage it, or None."""
        bad = ~torch.isfinite(new)
        if bool(bad.any()):
            return f"{what} would write non-finite values ({int(bad.sum())} NaN/Inf) into the {type(self.base_layer).__name__} weight"
        dtype = self.base_layer.weight.dtype
        if not bool(torch.isfinite(new.to(dtype)).all()):
            return f"{what} overflows {dtype} for the {type(self.base_layer).__name__} weight"
        return None

    def check_merge(self, *, what: str = "merging the adapter") -> None:
        """Raise ``ValueError`` if merging would write NaN/Inf (or overflow the weight's dtype).

        Nothing is modified; :func:`svdkit.lora.merge_lora` checks every layer this way before
        merging any, so a safe merge is all or nothing.

        Parameters
        ----------
        what : str
            How the message names the operation (e.g. ``"merging layer 'fc1'"``).
        """
        if self.merged:
            return
        problem = self._weight_problem(self._updated_weight(1.0, *self.factors()), what)
        if problem is not None:
            raise ValueError(problem)

    def _add_to_base(self, sign: float, B: torch.Tensor, A: torch.Tensor, *, safe: bool, what: str) -> None:
        """``W <- W + sign * s * B @ A`` computed in float32/float64 and written back in W's dtype."""
        W = weight_matrix(self.base_layer)
        dtype = _compute_dtype(W.dtype)
        with torch.no_grad():
            in_place = W.dtype == dtype and not safe and W.data_ptr() == self.base_layer.weight.data_ptr()
            if in_place:
                W.addmm_(B.detach().to(W.device, dtype), A.detach().to(W.device, dtype), alpha=sign * self.scaling)
                return
            new = self._updated_weight(sign, B, A)
            if safe:
                problem = self._weight_problem(new, what)
                if problem is not None:
                    raise ValueError(problem + "; the base weight was left unchanged")
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
        self._add_to_base(1.0, *self.factors(), safe=safe, what="merging the adapter")
        self.merged = True

    def unmerge(self) -> None:
        """Subtract ``s * B @ A`` from the base weight again; no-op if not merged."""
        if not self.merged:
            return
        self._add_to_base(-1.0, *self.factors(), safe=False, what="unmerging the adapter")
        self.merged = False

    def merge_and_unload(self, *, safe: bool = False) -> nn.Module:
        """Merge, then return the base layer (which now holds ``W + s * B @ A``)."""
        self.merge(safe=safe)
        return self.base_layer

    def move_into_adapter(self, B: torch.Tensor, A: torch.Tensor, *, residual: torch.Tensor | None = None) -> None:
        """Set the factors and subtract ``s * B @ A`` from the base weight (PiSSA-style inits).

        The residual ``W - s * B @ A`` is computed from the factors as stored (after the cast to
        the adapter dtype), so ``base + adapter`` reproduces ``W`` up to float32 rounding however
        approximate the decomposition that produced ``B`` and ``A`` was. The stored factors are
        kept in ``lora_B_init`` / ``lora_A_init``.

        Parameters
        ----------
        B : Tensor of shape (out, rank)
            The left factor.
        A : Tensor of shape (rank, d)
            The right factor.
        residual : Tensor of shape (out, d), optional
            The base matrix to write instead of computing ``W - s * B @ A`` here; for
            reproducing another library's rounding (PEFT's load-time PiSSA/OLoRA).
        """
        if self.merged:
            raise RuntimeError("unmerge the adapter before re-initialising it")
        if self.moved_weight:
            raise RuntimeError("this adapter already moved part of the base weight; wrap a fresh layer instead")
        if residual is not None and tuple(residual.shape) != self.matrix_shape:
            raise ValueError(f"the residual must have the weight matrix's shape {self.matrix_shape}, got {tuple(residual.shape)}")
        self.set_factors(B, A)
        B_, A_ = self.factors()
        if residual is None:
            self._add_to_base(-1.0, B_, A_, safe=False, what="moving the principal part into the adapter")
        else:
            with torch.no_grad():
                set_weight_matrix(self.base_layer, residual.detach())
        self.lora_A_init = A_.detach().clone()
        self.lora_B_init = B_.detach().clone()

    def restore_moved_weight(self) -> None:
        """Undo :meth:`move_into_adapter`: add ``s * B_init @ A_init`` back into the base weight
        (to float rounding) and forget the init factors; no-op if nothing was moved."""
        if not self.moved_weight:
            return
        if self.merged:
            raise RuntimeError("unmerge the adapter before restoring its base weight")
        B0 = self.lora_B_init.reshape(-1, self.rank)
        A0 = self.lora_A_init.reshape(self.rank, -1)
        self._add_to_base(1.0, B0, A0, safe=False, what="restoring the base weight")
        self.lora_A_init = None
        self.lora_B_init = None

    def extra_repr(self) -> str:
        return (
            f"r={self.rank}, lora_alpha={self.lora_alpha:g}, scaling={self.scaling:.4g}, lora_dropout={self.dropout_p:g}"
            + (", rslora" if self.use_rslora else "")
            + (", moved_weight" if self.moved_weight else "")
            + (", merged" if self.merged else "")
        )


def register_lora_wrapper(kind: str):
    """Class decorator: ``cls`` wraps layers of ``kind`` with LoRA (it becomes the kind's record's
    ``lora_wrapper``, see :mod:`svdkit.views`).

    Raises
    ------
    KeyError
        For a kind that :func:`svdkit.views.register_view` has not registered.
    """

    def decorate(cls: type[LoRALayer]) -> type[LoRALayer]:
        cls.kind = kind
        view_of_kind(kind).lora_wrapper = cls
        return cls

    return decorate


@register_lora_wrapper("linear")
class LoRALinear(LoRALayer):
    """LoRA on an ``nn.Linear``: ``A`` is (r, in), ``B`` is (out, r). See :class:`LoRALayer`."""

    def _make_adapters(self, base_layer: nn.Module, rank: int) -> tuple[nn.Module, nn.Module]:
        out_features, in_features = weight_matrix(base_layer).shape
        return nn.Linear(in_features, rank, bias=False), nn.Linear(rank, out_features, bias=False)


@register_lora_wrapper("conv1d")
class LoRAConv1D(LoRALinear):
    """LoRA on transformers' ``Conv1D`` (weight stored in x out); the factors are those of
    :class:`LoRALinear` on the (out, in) matrix, as PEFT does with ``fan_in_fan_out=True``."""


@register_lora_wrapper("conv2d")
class LoRAConv2d(LoRALayer):
    """LoRA on an ``nn.Conv2d`` (``groups == 1``), PEFT's layout.

    ``A`` is a Conv2d with the base kernel, stride, padding and dilation, weight (r, C_in, kh, kw);
    ``B`` is a 1x1 Conv2d, weight (C_out, r, 1, 1). As matrices they factor the (C_out, C_in*kh*kw)
    view of the kernel.
    """

    @classmethod
    def check_base(cls, base_layer: nn.Module) -> None:
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
    if view is None or view.lora_wrapper is None:
        kind = view.kind if view is not None else type(module).__name__
        raise TypeError(f"no LoRA wrapper for {type(module).__name__} ({kind}); supported: {', '.join(sorted(lora_kinds()))}")
    return view.lora_wrapper


def lora_kinds() -> tuple[str, ...]:
    """The layer kinds LoRA can wrap (those with a registered wrapper)."""
    return kinds(lambda view: view.lora_wrapper)


def wrap_lora(module: nn.Module, r: int, lora_alpha: float, *, lora_dropout: float = 0.0, use_rslora: bool = False) -> LoRALayer:
    """Wrap a Linear, Conv1D or Conv2d in its LoRA wrapper (adapter factors at zero).

    Parameters
    ----------
    module : nn.Module
    r, lora_alpha, lora_dropout, use_rslora
        See :class:`LoRALayer`.

    Returns
    -------
    LoRALayer
        Holds ``module`` itself as ``base_layer``.
    """
    return lora_wrapper_class(module)(module, r, lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora)
