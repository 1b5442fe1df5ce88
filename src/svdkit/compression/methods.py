"""Compression methods: how a weight matrix is transformed before its SVD is truncated.

Every method maps a weight ``W`` (m, n) and the layer's calibration statistics to a
:class:`Transform`: a matrix ``M = P W Q`` together with the maps that undo ``P`` and ``Q``.
Truncating the SVD of ``M`` at rank ``k`` gives ``W' = P^-1 M_k Q^-1``, and the singular values
of ``M`` measure what truncation costs in the method's own metric:

===========  =======================================  =========================================
method       M                                        sum of dropped s_i**2 equals
===========  =======================================  =========================================
``svd``      ``W``                                    ``||W - W'||_F**2``
``asvd``     ``W diag(mean|x|**asvd_alpha)``          (a heuristic; ASVD, arXiv:2312.05821)
``whiten``   ``W L`` with ``L L^T = E[x x^T]``        mean squared output error on the data
``fisher``   ``C^T W L`` with ``C C^T = E[g g^T]``    second-order estimate of the change of the
                                                      model's objective (``g``: its gradients at
                                                      the layer's output; Kronecker-factored)
===========  =======================================  =========================================

A method is registered with what it needs (:class:`Method`): calibration inputs, output
gradients, the :class:`~svdkit.compression.CompressConfig` fields it reads, whether the
closed-form refit applies to it. The config's validation, both pipelines and the analysis read
that record; no code outside a method's entry names it. The SVD itself happens in one place,
:func:`factorize` (or :func:`transformed_spectrum` when only the singular values are needed, as
for a global budget). Adding a method is one function decorated with :func:`register_method`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from ..linalg import gram_svd, gram_svdvals, split_factors, tail_error
from .statistics import LayerStats

__all__ = ["METHODS", "Method", "Factorization", "Transform", "factorize", "register_method", "transformed_spectrum"]


@dataclass
class Transform:
    """A weight in a method's metric, and the way back.

    Attributes
    ----------
    M : Tensor of shape (m, n), float64
        The transformed weight ``P W Q``.
    undo_left : callable or None
        ``X (m, k) -> P^-1 X``.
    undo_right : callable or None
        ``Y (k, n) -> Y Q^-1``.
    method : str
        Method that produced it (after any fallback).
    note : str
        Damping used, or why a fallback happened.
    importance : float
        Factor on the singular values when spectra are compared across layers for a budget (0
        for a layer the model's output does not depend on).
    """

    M: torch.Tensor
    undo_left: Callable[[torch.Tensor], torch.Tensor] | None = None
    undo_right: Callable[[torch.Tensor], torch.Tensor] | None = None
    method: str = "svd"
    note: str = ""
    importance: float = 1.0


@dataclass
class Factorization:
    """The SVD of a :class:`Transform`.

    Attributes
    ----------
    U : Tensor of shape (m, r), float64
    S : Tensor of shape (r,), float64
    Vh : Tensor of shape (r, n), float64
    transform : Transform
        The way back, the method, its note and importance (its matrix ``M`` is not kept).
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    transform: Transform

    @property
    def method(self) -> str:
        return self.transform.method

    @property
    def note(self) -> str:
        return self.transform.note

    @property
    def importance(self) -> float:
        return self.transform.importance

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Balanced rank-``k`` factors ``left`` (m, k), ``right`` (k, n) with ``W' = left @ right``."""
        left, right = split_factors(self.U[:, :k], self.S[:k], self.Vh[:k])
        if self.transform.undo_left is not None:
            left = self.transform.undo_left(left)
        if self.transform.undo_right is not None:
            right = self.transform.undo_right(right)
        return left, right

    def predicted_error(self, k: int) -> float:
        """Relative error of the rank-``k`` truncation in the method's metric (Eckart-Young)."""
        return float(tail_error(self.S, k))


def factorize(transform: Transform) -> Factorization:
    """The thin SVD of ``transform.M`` (float64, by :func:`svdkit.linalg.gram_svd`: the
    eigendecomposition of the smaller Gram matrix, a third of an SVD's time; every truncation
    is the exact projection of ``M`` on the computed singular subspace), carrying the way back."""
    U, S, Vh = gram_svd(transform.M)
    # The factorization keeps the way back, not the (m, n) matrix it no longer needs.
    return Factorization(U, S, Vh, dataclasses.replace(transform, M=transform.M.new_empty(0)))


def transformed_spectrum(transform: Transform) -> torch.Tensor:
    """The singular values of ``transform.M``, shape (min(m, n),), float64, descending
    (:func:`svdkit.linalg.gram_svdvals`: values below about ``1e-8 * s_max`` are noise, which
    a budget never keeps)."""
    return gram_svdvals(transform.M)


TransformFunction = Callable[..., Transform]


@dataclass(frozen=True)
class Method:
    """A registered compression method and what it needs.

    Attributes
    ----------
    name : str
    transform : callable
        ``transform(W, stats, **options) -> Transform``; ``stats`` is the layer's
        :class:`~svdkit.compression.statistics.LayerStats` (None without calibration data).
    needs_inputs : bool
        It reads the layer's input statistics (calibration data is required).
    needs_gradients : bool
        It reads the Gram of the objective's gradients at the layer's output (the pipelines run
        backward passes for it).
    options : tuple of str
        The :class:`~svdkit.compression.CompressConfig` fields passed to ``transform`` by name.
    refit : bool
        Its factors live in the input-whitened metric, so the closed-form refit
        (:mod:`svdkit.compression.refit`) applies.
    """

    name: str
    transform: TransformFunction
    needs_inputs: bool = False
    needs_gradients: bool = False
    options: tuple[str, ...] = ()
    refit: bool = False

    @property
    def needs_data(self) -> bool:
        """Whether the method needs calibration data."""
        return self.needs_inputs or self.needs_gradients


METHODS: dict[str, Method] = {}
_NEEDS = ("inputs", "gradients")


def register_method(
    name: str, *, needs: tuple[str, ...] = (), options: tuple[str, ...] = (), refit: bool = False
) -> Callable[[TransformFunction], TransformFunction]:
    """Decorator adding ``fn(W, stats, **options) -> Transform`` to :data:`METHODS`.

    Parameters
    ----------
    name : str
        The method's name (``CompressConfig.method``, ``--method``).
    needs : tuple of {"inputs", "gradients"}
        What the method reads of the calibration (see :class:`Method`).
    options : tuple of str
        ``CompressConfig`` fields ``fn`` takes as keyword arguments.
    refit : bool
        Whether the closed-form refit applies to its factors.

    Raises
    ------
    ValueError
        For an unknown need, or an option that is no ``CompressConfig`` field (checked when a
        config names the method).
    """
    unknown = set(needs) - set(_NEEDS)
    if unknown:
        raise ValueError(f"register_method({name!r}): unknown needs {sorted(unknown)}; choose from {_NEEDS}")

    def decorate(fn: TransformFunction) -> TransformFunction:
        METHODS[name] = Method(name, fn, "inputs" in needs or "gradients" in needs, "gradients" in needs, tuple(options), refit)
        return fn

    return decorate


@register_method("svd")
def plain_svd(W: torch.Tensor, stats: LayerStats | None = None) -> Transform:
    """Plain truncated SVD of ``W``."""
    return Transform(W.to(torch.float64), method="svd")


@register_method("asvd", needs=("inputs",), options=("asvd_alpha",))
def activation_scaled_svd(W: torch.Tensor, stats: LayerStats | None = None, *, asvd_alpha: float = 0.5) -> Transform:
    """ASVD: scale input channel ``j`` by ``mean|x_j|**asvd_alpha + 1e-6`` before the SVD, unscale after."""
    if stats is None:
        raise ValueError("method 'asvd' needs calibration data")
    scale = (stats.abs_mean.to(torch.float64) ** asvd_alpha + 1e-6).to(W.device)
    return Transform(W.to(torch.float64) * scale, undo_right=lambda Y: Y / scale, method="asvd")


@register_method("whiten", needs=("inputs",), options=("damping",), refit=True)
def whitened_svd(W: torch.Tensor, stats: LayerStats | None = None, *, damping: float = 1e-6) -> Transform:
    """SVD-LLM truncation-aware whitening: SVD of ``W L``, ``L^-1`` folded into the right factor.

    Falls back to plain SVD (with the reason in :attr:`Transform.note`) if the layer saw only
    zero inputs or the input Gram cannot be factorized even with damping.
    """
    if stats is None:
        raise ValueError("method 'whiten' needs calibration data")
    try:
        L, used = stats.input_whitening(damping)
    except torch.linalg.LinAlgError as exc:
        fallback = plain_svd(W)
        fallback.note = f"whitening failed ({exc}); plain SVD"
        return fallback
    L = L.to(W.device, torch.float64)
    return Transform(
        W.to(torch.float64) @ L,
        undo_right=lambda Y: torch.linalg.solve_triangular(L, Y, upper=False, left=False),
        method="whiten", note=_damping_note(used, damping),
    )


@register_method("fisher", needs=("inputs", "gradients"), options=("damping", "output_damping"), refit=True)
def fisher_whitened_svd(
    W: torch.Tensor, stats: LayerStats | None = None, *, damping: float = 1e-6, output_damping: float = 1e-2
) -> Transform:
    """Two-sided whitening: SVD of ``C^T W L`` with ``L`` from the input Gram and ``C`` from the
    Gram of the gradients of the model's objective at the layer's output (Kronecker-factored
    curvature).

    Minimizes a second-order estimate of the change of the model's objective rather than of the
    layer's output, which is also what makes spectra of different layers comparable for a global
    budget. Falls back to ``whiten`` without gradient statistics.
    """
    if stats is None:
        raise ValueError("method 'fisher' needs calibration data")
    output_gram = stats.output_gram()
    if output_gram is None or not bool((output_gram.diagonal() > 0).any()):
        fallback = whitened_svd(W, stats, damping=damping)
        if output_gram is None:
            reason = "no gradient statistics: input whitening only"
        else:
            reason = "the model output does not depend on this layer on the calibration data"
            fallback.importance = 0.0
        fallback.note = (fallback.note + "; " if fallback.note else "") + reason
        return fallback
    try:
        L, used = stats.input_whitening(damping)
        C, _ = stats.output_whitening(output_damping)
    except torch.linalg.LinAlgError as exc:
        fallback = plain_svd(W)
        fallback.note = f"whitening failed ({exc}); plain SVD"
        return fallback
    L, C = L.to(W.device, torch.float64), C.to(W.device, torch.float64)
    # E[g g^T] = C C^T, so ||C^T E L||_F is the error norm; M = C^T W L.
    return Transform(
        C.T @ W.to(torch.float64) @ L,
        undo_left=lambda X: torch.linalg.solve_triangular(C.T, X, upper=True),
        undo_right=lambda Y: torch.linalg.solve_triangular(L, Y, upper=False, left=False),
        method="fisher", note=_damping_note(used, damping),
    )


def _damping_note(used: float, requested: float) -> str:
    return f"damping raised to {used:g}" if used > requested * (1 + 1e-9) else ""
