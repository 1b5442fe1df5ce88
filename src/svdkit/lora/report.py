"""What the LoRA analyses return: per-layer records with ``to_table()`` / ``to_dict()`` /
``to_json()`` / ``to_pandas()``, the names every svdkit report uses.

- :class:`ExtractionReport` (from :func:`svdkit.lora.extract_lora`): per layer, the rank of the
  extracted adapter and how much of the weight change it keeps.
- :class:`DeltaReport` (from :func:`svdkit.lora.analyze_deltas`): per layer, the spectrum of the
  weight change and the error of its low-rank approximations (:class:`DeltaSpectrum`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

from ..exports import json_text, pandas

__all__ = ["DeltaReport", "DeltaSpectrum", "ExtractionReport", "LayerExtraction"]


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Aligned plain-text lines: the first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(header), "  ".join("-" * w for w in widths), *[line(r) for r in rows]]


@dataclass(frozen=True)
class LayerExtraction:
    """What the adapter extracted for one layer keeps of its weight change.

    Attributes
    ----------
    name : str
    shape : (int, int)
        Shape (out, d) of the weight matrix.
    rank : int
        The adapter's rank ``r``.
    lora_alpha : float
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
    lora_alpha: float
    energy_captured: float
    relative_error: float
    rank_90: int
    rank_99: int
    delta_norm: float
    relative_change: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {**asdict(self), "shape": list(self.shape)}


@dataclass(frozen=True)
class ExtractionReport:
    """Per-layer results of :func:`svdkit.lora.extract_lora`.

    Attributes
    ----------
    layers : tuple of LayerExtraction
        Layers that received an adapter, in model order.
    unchanged : tuple of str
        Selected layers whose weights did not change (no adapter was made for them).
    rank : int or dict
        The rank spec used (``RankSpec.to_dict()`` form for typed specs).
    svd_method : str
        ``"auto"``, ``"exact"`` or ``"randomized"``, as given to :func:`~svdkit.lora.extract_lora`.
    """

    layers: tuple[LayerExtraction, ...]
    unchanged: tuple[str, ...]
    rank: Any
    svd_method: str

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
        """JSON-ready dict: the spec, the totals, the unchanged layers and one dict per layer."""
        return {
            "rank": self.rank,
            "svd_method": self.svd_method,
            "energy_captured": self.energy_captured,
            "adapter_parameters": self.adapter_parameters,
            "unchanged": list(self.unchanged),
            "layers": [layer.to_dict() for layer in self.layers],
        }

    def to_json(self, path: str | os.PathLike | None = None, *, indent: int = 2) -> str:
        """JSON text of :meth:`to_dict`; written to ``path`` when given."""
        return json_text(self.to_dict(), path, indent=indent)

    def to_pandas(self):
        """A ``pandas.DataFrame`` with one row per layer (needs pandas)."""
        return pandas().DataFrame.from_records([layer.to_dict() for layer in self.layers])

    def to_table(self) -> str:
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
        lines = _text_table(header, rows)
        lines.append(
            f"{len(self.layers)} adapters, {self.adapter_parameters:,} parameters, "
            f"{100 * self.energy_captured:.2f}% of the weight-change energy"
            + (f"; {len(self.unchanged)} unchanged layer(s) skipped" if self.unchanged else "")
        )
        return "\n".join(lines)


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


@dataclass(frozen=True)
class DeltaReport:
    """The weight-change spectra of a model pair, one :class:`DeltaSpectrum` per layer.

    Iterating, ``len`` and indexing go over the spectra, in model order.

    Attributes
    ----------
    spectra : tuple of DeltaSpectrum
    """

    spectra: tuple[DeltaSpectrum, ...]

    def __iter__(self) -> Iterator[DeltaSpectrum]:
        return iter(self.spectra)

    def __len__(self) -> int:
        return len(self.spectra)

    def __getitem__(self, index: int) -> DeltaSpectrum:
        return self.spectra[index]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``{"layers": [DeltaSpectrum.to_dict(), ...]}``."""
        return {"layers": [s.to_dict() for s in self.spectra]}

    def to_json(self, path: str | os.PathLike | None = None, *, indent: int = 2) -> str:
        """JSON text of :meth:`to_dict`; written to ``path`` when given."""
        return json_text(self.to_dict(), path, indent=indent)

    def to_pandas(self):
        """A ``pandas.DataFrame``, one row per layer: the columns of :meth:`to_table` as numbers
        (``err@k`` for each rank), without the singular values (needs pandas)."""
        rows = []
        for s in self.spectra:
            row: dict[str, Any] = {"name": s.name, "out": s.shape[0], "in": s.shape[1], "relative_change": s.relative_change}
            row.update({f"err@{k}": v for k, v in s.rank_errors.items()})
            row.update(top_energy_share=s.top_energy_share, rank_90=s.rank_90, rank_99=s.rank_99, delta_norm=s.delta_norm)
            rows.append(row)
        return pandas().DataFrame.from_records(rows)

    def to_table(self) -> str:
        """A plain-text table: one row per layer with its shape, ``||dW||/||W||``, the relative
        error at each rank, the top-``k`` energy share and the ranks for 90 % / 99 % of the energy."""
        if not self.spectra:
            return "(no layers)"
        ranks = list(self.spectra[0].rank_errors)
        top = self.spectra[0].top
        header = ["layer", "shape", "|dW|/|W|"] + [f"err@{k}" for k in ranks] + [f"top{top} E", "r90", "r99"]
        rows = []
        for s in self.spectra:
            rel = "-" if s.relative_change is None else f"{s.relative_change:.3g}"
            rows.append(
                [s.name, f"{s.shape[0]}x{s.shape[1]}", rel]
                + [f"{s.rank_errors[k]:.3f}" for k in ranks]
                + [f"{100 * s.top_energy_share:.1f}%", str(s.rank_90), str(s.rank_99)]
            )
        return "\n".join(_text_table(header, rows))
