"""The LoRA init registry: one function per way of filling ``A`` and ``B``.

====================  ========================================================  ===============
name                  what the adapter starts as                                base weight
====================  ========================================================  ===============
``gaussian``          ``A ~ N(0, 1/r^2)`` (std ``1/r``, PEFT's "gaussian"),      untouched
                      ``B = 0``: classic LoRA, output unchanged
``kaiming``           ``A`` kaiming-uniform (``U(-1/sqrt(d), 1/sqrt(d))``,       untouched
                      PEFT's default ``init_lora_weights=True``), ``B = 0``
``pissa``             the principal ``r`` singular triplets of ``W``             ``W - s B A``
                      (arXiv:2404.02948), output unchanged
``milora``            the minor ``r`` singular triplets of ``W``                 ``W - s B A``
                      (arXiv:2406.09044), output unchanged
``svd_delta``         the best rank-``r`` approximation of a given target        untouched
                      change ``delta`` (Eckart-Young): output moves to
                      ``W + delta_r``
``eva``               ``A`` = the top-``r`` right singular vectors of the        untouched
                      layer's inputs (arXiv:2410.07170), ``B = 0``
====================  ========================================================  ===============

Every SVD-based init splits ``sigma`` evenly with :func:`svdkit.linalg.split_factors`:
``B = U sqrt(S/s)``, ``A = sqrt(S/s) Vh``, so ``s * B @ A = U S Vh``.

Each init also names its *spectrum source*, the matrix whose singular values a typed rank
(``Energy(0.9)``, ``ErrorTol(0.1)``, ...) is resolved on: the weight for ``gaussian``,
``kaiming``, ``pissa`` and ``milora``, the target change for ``svd_delta``, the layer's inputs
(the square roots of the input Gram's eigenvalues) for ``eva``. Adding an init is one decorated
function::

    @register_init("mine", needs=("delta",))
    def mine(layer: LoRALayer, ctx: InitContext) -> None:
        ...
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Literal

import torch
from torch import nn

from ..calibrate import GramStats
from ..layers.lora import LoRALayer
from ..linalg import SVDMethod, gram_eigenvalues, split_factors, svd, svd_flip, svdvals, truncated_svd
from ..views import weight_matrix

__all__ = [
    "InitContext",
    "LoRAInit",
    "available_inits",
    "check_init_inputs",
    "get_init",
    "init_spectrum",
    "register_init",
    "top_triplets",
    "unregister_init",
]

_NEEDS = ("delta", "input_stats")


@dataclass(frozen=True)
class InitContext:
    """What an init may use besides the layer itself.

    Attributes
    ----------
    name : str
        The layer's dotted name in the model (for error messages).
    seed : int
        Seed for this layer's random draws (Gaussian factors, randomized SVD sketches).
    svd_method : {"auto", "exact", "randomized"}
        How to decompose (:func:`svdkit.linalg.truncated_svd`); ``"auto"`` is randomized when
        the rank is below a tenth of ``min(m, n)``.
    n_iter : int or "auto"
        Krylov steps of :func:`svdkit.linalg.randomized_svd`.
    oversamples : int
        Extra sketch columns of :func:`svdkit.linalg.randomized_svd`.
    delta : Tensor of shape (out, d) or None
        Target weight change, for ``svd_delta``.
    input_stats : GramStats or None
        Calibration statistics of the layer's inputs, for ``eva``.
    """

    name: str = ""
    seed: int = 0
    svd_method: SVDMethod = "auto"
    n_iter: int | Literal["auto"] = 4
    oversamples: int = 0
    delta: torch.Tensor | None = None
    input_stats: GramStats | None = None


@dataclass(frozen=True)
class LoRAInit:
    """A registered init.

    Attributes
    ----------
    name : str
    fn : callable
        ``fn(layer, ctx)`` fills ``layer``'s factors (and, if ``moves_weight``, its base weight).
    needs : tuple of str
        Data the init requires in its :class:`InitContext`: ``"delta"``, ``"input_stats"``.
    moves_weight : bool
        Whether the init subtracts the adapter from the base weight (outputs stay unchanged).
    randomized : bool
        Whether a randomized SVD can serve it (the minor triplets need the exact SVD).
    spectrum : {"weight", "delta", "inputs"}
        Whose singular values a typed rank is resolved on (see the module docstring).
    """

    name: str
    fn: Callable[[LoRALayer, InitContext], None]
    needs: tuple[str, ...] = ()
    moves_weight: bool = False
    randomized: bool = True
    spectrum: str = "weight"

    @property
    def reads_source(self) -> bool:
        """Whether the init decomposes its spectrum source (then it must be finite)."""
        return self.moves_weight or bool(self.needs)


_INITS: dict[str, LoRAInit] = {}


def _weight_spectrum(module: nn.Module, delta: torch.Tensor | None, stats: GramStats | None) -> torch.Tensor:
    return svdvals(_working(weight_matrix(module).detach()))


def _delta_spectrum(module: nn.Module, delta: torch.Tensor | None, stats: GramStats | None) -> torch.Tensor:
    return svdvals(_working(delta.detach()))


def _input_spectrum(module: nn.Module, delta: torch.Tensor | None, stats: GramStats | None) -> torch.Tensor:
    return gram_eigenvalues(stats.gram).sqrt()


# spectrum source -> singular values of that matrix, descending
_SPECTRA: dict[str, Callable[[nn.Module, torch.Tensor | None, GramStats | None], torch.Tensor]] = {
    "weight": _weight_spectrum,
    "delta": _delta_spectrum,
    "inputs": _input_spectrum,
}


def register_init(
    name: str,
    *,
    needs: Iterable[str] = (),
    moves_weight: bool = False,
    randomized: bool = True,
    spectrum: str | None = None,
) -> Callable[[Callable[[LoRALayer, InitContext], None]], Callable[[LoRALayer, InitContext], None]]:
    """Decorator adding an init function to the registry under ``name``.

    Parameters
    ----------
    name : str
    needs : iterable of str
        ``"delta"`` and/or ``"input_stats"``.
    moves_weight : bool
        The init subtracts its adapter from the base weight.
    randomized : bool
        A randomized SVD can serve it.
    spectrum : {"weight", "delta", "inputs"}, optional
        Whose singular values a typed rank is resolved on; default ``"delta"`` when the init
        needs a delta, ``"inputs"`` when it needs input statistics, else ``"weight"``.
    """
    needs = tuple(needs)
    unknown = [n for n in needs if n not in _NEEDS]
    if unknown:
        raise ValueError(f"init {name!r}: unknown needs {unknown}; choose from {_NEEDS}")
    if spectrum is None:
        spectrum = "delta" if "delta" in needs else "inputs" if "input_stats" in needs else "weight"
    if spectrum not in _SPECTRA:
        raise ValueError(f"init {name!r}: unknown spectrum {spectrum!r}; choose from {sorted(_SPECTRA)}")

    def decorate(fn: Callable[[LoRALayer, InitContext], None]) -> Callable[[LoRALayer, InitContext], None]:
        _INITS[name] = LoRAInit(name, fn, needs, moves_weight, randomized, spectrum)
        return fn

    return decorate


def unregister_init(name: str) -> None:
    """Remove an init from the registry (for tests and plug-ins); unknown names are ignored."""
    _INITS.pop(name, None)


def available_inits() -> list[str]:
    """Names of the registered inits."""
    return sorted(_INITS)


def get_init(name: str) -> LoRAInit:
    """The registered init called ``name``; ``ValueError`` listing the choices otherwise."""
    try:
        return _INITS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown LoRA init {name!r}; choose one of {available_inits()}") from None


def init_spectrum(init: LoRAInit, module: nn.Module, *, delta: torch.Tensor | None = None,
                  input_stats: GramStats | None = None) -> torch.Tensor:
    """The singular values a typed rank is resolved on for ``init`` on ``module``.

    Returns
    -------
    Tensor of shape (k,)
        Descending: of the weight matrix (``k = min(out, d)``), of the target change, or of the
        layer's stacked inputs (``k = d``, from the input Gram).
    """
    return _SPECTRA[init.spectrum](module, delta, input_stats)


def check_init_inputs(init: LoRAInit, name: str, module: nn.Module, *, delta: torch.Tensor | None = None,
                      input_stats: GramStats | None = None, spectrum_needed: bool = False) -> None:
    """Raise ``ValueError`` naming the layer if what ``init`` decomposes has the wrong shape or is
    not finite (checked before any layer is modified).

    Parameters
    ----------
    spectrum_needed : bool
        The rank is a typed spec, so the spectrum source is decomposed even by inits that do not
        read it (``gaussian``).
    """
    out_features, d = weight_matrix(module).shape
    if delta is not None and tuple(delta.shape) != (out_features, d):
        raise ValueError(
            f"the weight change for layer {name!r} has shape {tuple(delta.shape)}, "
            f"but the layer's weight matrix is {(out_features, d)}"
        )
    if input_stats is not None and tuple(input_stats.gram.shape) != (d, d):
        raise ValueError(
            f"the input statistics for layer {name!r} are {tuple(input_stats.gram.shape)}, expected ({d}, {d}): "
            "they were collected for another layer or model"
        )
    if not (init.reads_source or spectrum_needed):
        return
    source = {"weight": weight_matrix(module), "delta": delta,
              "inputs": input_stats.gram if input_stats is not None else None}[init.spectrum]
    if source is None:
        return
    bad = int((~torch.isfinite(source.detach())).sum())
    if bad:
        what = {
            "weight": f"its weight holds {bad} non-finite value(s) (NaN/Inf)",
            "delta": f"its target weight change holds {bad} non-finite value(s) (NaN/Inf)",
            "inputs": "its input statistics hold NaN/Inf: a calibration batch that reaches it is not finite",
        }[init.spectrum]
        raise ValueError(f"layer {name!r}: {what}; init {init.name!r} needs it finite")


def top_triplets(M: torch.Tensor, rank: int, ctx: InitContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-``rank`` singular triplets of ``M`` by the context's SVD method.

    Parameters
    ----------
    M : Tensor of shape (m, n)
    rank : int
    ctx : InitContext

    Returns
    -------
    U : Tensor of shape (m, rank)
    S : Tensor of shape (rank,)
    Vh : Tensor of shape (rank, n)
        In ``M``'s working dtype (float32, or float64 for float64 input).
    """
    factors, _ = truncated_svd(
        M, rank, svd_method=ctx.svd_method, seed=ctx.seed, n_iter=ctx.n_iter, oversamples=ctx.oversamples
    )
    return factors.U, factors.S, factors.Vh


def _working(M: torch.Tensor) -> torch.Tensor:
    return M.float() if M.dtype != torch.float64 else M


def _matrix(layer: LoRALayer) -> torch.Tensor:
    return _working(weight_matrix(layer.base_layer).detach())


@register_init("gaussian")
def gaussian(layer: LoRALayer, ctx: InitContext) -> None:
    """Classic LoRA: ``A`` Gaussian with std ``1/r`` (PEFT's ``"gaussian"``), ``B = 0``."""
    B, A = layer.factors()
    generator = torch.Generator().manual_seed(int(ctx.seed))
    A0 = torch.randn(A.shape, generator=generator, dtype=torch.float64) / layer.rank
    layer.set_factors(torch.zeros_like(B), A0)


@register_init("kaiming")
def kaiming(layer: LoRALayer, ctx: InitContext) -> None:
    """PEFT's default (``init_lora_weights=True``): ``A`` kaiming-uniform with ``a = sqrt(5)``,
    i.e. ``U(-1/sqrt(d), 1/sqrt(d))`` as ``nn.Linear`` initialises its weight; ``B = 0``."""
    B, A = layer.factors()
    generator = torch.Generator().manual_seed(int(ctx.seed))
    bound = 1.0 / math.sqrt(A.shape[1])
    A0 = (torch.rand(A.shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    layer.set_factors(torch.zeros_like(B), A0)


@register_init("pissa", moves_weight=True)
def pissa(layer: LoRALayer, ctx: InitContext) -> None:
    """PiSSA: the principal ``r`` triplets of ``W`` move into the adapter; the base keeps the residual."""
    U, S, Vh = top_triplets(_matrix(layer), layer.rank, ctx)
    layer.move_into_adapter(*split_factors(U, S, Vh, scale=layer.scaling))


@register_init("milora", moves_weight=True, randomized=False)
def milora(layer: LoRALayer, ctx: InitContext) -> None:
    """MiLoRA: the minor ``r`` triplets of ``W`` move into the adapter (exact SVD)."""
    U, S, Vh = svd(_matrix(layer))
    r = layer.rank
    layer.move_into_adapter(*split_factors(U[:, -r:], S[-r:], Vh[-r:], scale=layer.scaling))


@register_init("svd_delta", needs=("delta",))
def svd_delta(layer: LoRALayer, ctx: InitContext) -> None:
    """The best rank-``r`` adapter for a target change: ``s * B @ A = [delta]_r`` (Eckart-Young)."""
    delta = ctx.delta
    if delta is None:
        raise ValueError(f"init 'svd_delta' of layer {ctx.name!r} needs a target weight change (deltas=)")
    if tuple(delta.shape) != layer.matrix_shape:
        raise ValueError(
            f"the weight change for layer {ctx.name!r} has shape {tuple(delta.shape)}, "
            f"but the layer's weight matrix is {layer.matrix_shape}"
        )
    U, S, Vh = top_triplets(_working(delta.detach()), layer.rank, ctx)
    layer.set_factors(*split_factors(U, S, Vh, scale=layer.scaling))


@register_init("eva", needs=("input_stats",))
def eva(layer: LoRALayer, ctx: InitContext) -> None:
    """EVA: ``A`` = top right singular vectors of the layer's inputs ``X`` (rows of ``A``
    orthonormal), from the eigenvectors of the float64 Gram ``X^T X``; ``B = 0``."""
    stats = ctx.input_stats
    if stats is None:
        raise ValueError(f"init 'eva' of layer {ctx.name!r} needs calibration statistics (calibration= or input_stats=)")
    out_features, d = layer.matrix_shape
    if tuple(stats.gram.shape) != (d, d):
        raise ValueError(f"the input statistics for layer {ctx.name!r} are {tuple(stats.gram.shape)}, expected ({d}, {d})")
    _, vectors = torch.linalg.eigh(stats.gram.double())
    V = vectors[:, -layer.rank:].flip(-1)  # (d, r), descending eigenvalues
    V, _ = svd_flip(V, V.mT)
    B, _ = layer.factors()
    layer.set_factors(torch.zeros_like(B), V.mT)
