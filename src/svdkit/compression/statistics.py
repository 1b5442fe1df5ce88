"""A layer's calibration statistics: the Gram of its inputs and, for methods that need them, the
Gram of the objective's gradients at its output (see :mod:`svdkit.compression.curvature`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calibrate import GramStats

__all__ = ["LayerStats"]


@dataclass
class LayerStats:
    """Calibration statistics of one layer.

    Attributes
    ----------
    inputs : GramStats
        Gram of the layer's input vectors (d_in, d_in) and mean |x|.
    gradients : GramStats or None
        Gram of the gradients of the objective at the layer's output vectors (d_out, d_out),
        when the method needs them.
    share : float
        The fraction of its block's tokens the layer sees (1 but for a mixture's experts): its
        spectrum is weighed by ``sqrt(share)`` when layers are compared for a budget.
    tokens : int or None
        Calibration tokens routed to an expert (None for other layers).
    """

    inputs: GramStats
    gradients: GramStats | None = None
    share: float = 1.0
    tokens: int | None = None

    def input_gram(self) -> torch.Tensor:
        """``E[x x^T]``, shape (d_in, d_in), float64."""
        return self.inputs.gram / max(self.inputs.count, 1)

    def output_gram(self) -> torch.Tensor | None:
        """``E[g g^T]``, shape (d_out, d_out), float64; None without gradient statistics."""
        if self.gradients is None or self.gradients.count == 0:
            return None
        return self.gradients.gram / self.gradients.count

    def input_whitening(self, damping: float) -> tuple[torch.Tensor, float]:
        """Cholesky factor of ``E[x x^T]`` with relative damping (see :meth:`GramStats.whitening`)."""
        return self.inputs.whitening(damping)

    def output_whitening(self, damping: float) -> tuple[torch.Tensor, float]:
        """Cholesky factor of ``E[g g^T]`` with relative damping; only with gradient statistics."""
        if self.gradients is None:
            raise ValueError("no gradient statistics were collected")
        return self.gradients.whitening(damping)

    @property
    def abs_mean(self) -> torch.Tensor:
        """Mean |x| per input feature, shape (d_in,)."""
        return self.inputs.abs_mean

    def group(self, index: int, groups: int) -> "LayerStats":
        """The statistics of one group of a grouped convolution (diagonal blocks of the Grams)."""
        if groups == 1:
            return self
        return LayerStats(_block(self.inputs, index, groups), None if self.gradients is None else _block(self.gradients, index, groups),
                          self.share, self.tokens)


def _block(stats: GramStats, index: int, groups: int) -> GramStats:
    size = stats.gram.shape[0] // groups
    part = slice(index * size, (index + 1) * size)
    return GramStats(stats.gram[part, part], stats.abs_sum[part], stats.count)
