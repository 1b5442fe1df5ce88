"""The LoRA init registry: one function per way of filling ``A`` and ``B``.

====================  ========================================================  ===============
name                  what the adapter starts as                                base weight
====================  ========================================================  ===============
``gaussian``          ``A ~ N(0, 1/r^2)`` (std ``1/r``, PEFT's "gaussian"),      untouched
                      ``B = 0``: classic LoRA, output unchanged
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

Every SVD-based init splits ``sigma`` evenly: ``A = sqrt(S/s) Vh``, ``B = U sqrt(S/s)``, so
``s * B @ A = U S Vh``. Adding an init is one decorated function::

    @register_init("mine", needs=("delta",))
    def mine(layer: LoRALayer, ctx: InitContext) -> None:
        ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Literal

import torch

from ..calibrate import InputStats
from ..layers.lora import LoRALayer
from ..linalg import randomized_svd, svd, svd_flip
from ..views import weight_matrix

__all__ = [
    "InitContext",
    "LoRAInit",
    "SVDMethod",
    "available_inits",
    "get_init",
    "register_init",
    "top_triplets",
]

SVDMethod = Literal["auto", "exact", "randomized"]
SVD_METHODS = ("auto", "exact", "randomized")
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
    svd : {"auto", "exact", "randomized"}
        How to decompose. ``"auto"`` is randomized when ``rank <= min(m, n) / 10``.
    n_iter : int or "auto"
        Krylov steps of :func:`svdkit.linalg.randomized_svd`.
    oversamples : int
        Extra sketch columns of :func:`svdkit.linalg.randomized_svd`.
    delta : Tensor of shape (out, d) or None
        Target weight change, for ``svd_delta``.
    input_stats : InputStats or None
        Calibration statistics of the layer's inputs, for ``eva``.
    """

    name: str = ""
    seed: int = 0
    svd: SVDMethod = "auto"
    n_iter: int | Literal["auto"] = 4
    oversamples: int = 0
    delta: torch.Tensor | None = None
    input_stats: InputStats | None = None


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
    """

    name: str
    fn: Callable[[LoRALayer, InitContext], None]
    needs: tuple[str, ...] = ()
    moves_weight: bool = False
    randomized: bool = True


_INITS: dict[str, LoRAInit] = {}


def register_init(
    name: str, *, needs: Iterable[str] = (), moves_weight: bool = False, randomized: bool = True
) -> Callable[[Callable[[LoRALayer, InitContext], None]], Callable[[LoRALayer, InitContext], None]]:
    """Decorator adding an init function to the registry under ``name``."""
    needs = tuple(needs)
    unknown = [n for n in needs if n not in _NEEDS]
    if unknown:
        raise ValueError(f"init {name!r}: unknown needs {unknown}; choose from {_NEEDS}")

    def decorate(fn: Callable[[LoRALayer, InitContext], None]) -> Callable[[LoRALayer, InitContext], None]:
        _INITS[name] = LoRAInit(name, fn, needs, moves_weight, randomized)
        return fn

    return decorate


def available_inits() -> list[str]:
    """Names of the registered inits."""
    return sorted(_INITS)


def get_init(name: str) -> LoRAInit:
    """The registered init called ``name``; ``ValueError`` listing the choices otherwise."""
    try:
        return _INITS[name]
    except KeyError:
        raise ValueError(f"unknown LoRA init {name!r}; choose one of {available_inits()}") from None


def _use_randomized(method: str, rank: int, shape: tuple[int, int]) -> bool:
    if method not in SVD_METHODS:
        raise ValueError(f"svd must be one of {SVD_METHODS}, got {method!r}")
    return method == "randomized" or (method == "auto" and rank <= 0.1 * min(shape))


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
    if _use_randomized(ctx.svd, rank, tuple(M.shape)):
        U, S, Vh = randomized_svd(M, rank, n_iter=ctx.n_iter, oversamples=ctx.oversamples, seed=ctx.seed)
        return U, S, Vh
    U, S, Vh = svd(M)
    return U[:, :rank], S[:rank], Vh[:rank]


def _split_sigma(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = sqrt(S/s) Vh``, ``B = U sqrt(S/s)``, so that ``s * B @ A = U diag(S) Vh``."""
    root = (S.clamp_min(0) / scaling).sqrt()
    return root.unsqueeze(-1) * Vh, U * root


def _matrix(layer: LoRALayer) -> torch.Tensor:
    W = weight_matrix(layer.base_layer).detach()
    return W.float() if W.dtype != torch.float64 else W


@register_init("gaussian")
def gaussian(layer: LoRALayer, ctx: InitContext) -> None:
    """Classic LoRA: ``A`` Gaussian with std ``1/r`` (PEFT's ``"gaussian"``), ``B = 0``."""
    A, B = layer.factors()
    generator = torch.Generator().manual_seed(int(ctx.seed))
    A0 = torch.randn(A.shape, generator=generator, dtype=torch.float64) / layer.rank
    layer.set_factors(A0, torch.zeros_like(B))


@register_init("pissa", moves_weight=True)
def pissa(layer: LoRALayer, ctx: InitContext) -> None:
    """PiSSA: the principal ``r`` triplets of ``W`` move into the adapter; the base keeps the residual."""
    U, S, Vh = top_triplets(_matrix(layer), layer.rank, ctx)
    A, B = _split_sigma(U, S, Vh, layer.scaling)
    layer.move_into_adapter(A, B)


@register_init("milora", moves_weight=True, randomized=False)
def milora(layer: LoRALayer, ctx: InitContext) -> None:
    """MiLoRA: the minor ``r`` triplets of ``W`` move into the adapter (exact SVD)."""
    U, S, Vh = svd(_matrix(layer))
    r = layer.rank
    A, B = _split_sigma(U[:, -r:], S[-r:], Vh[-r:], layer.scaling)
    layer.move_into_adapter(A, B)


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
    D = delta.detach()
    D = D.float() if D.dtype != torch.float64 else D
    U, S, Vh = top_triplets(D, layer.rank, ctx)
    A, B = _split_sigma(U, S, Vh, layer.scaling)
    layer.set_factors(A, B)


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
    A, B = layer.factors()
    layer.set_factors(V.mT, torch.zeros_like(B))
