"""What a compression did, per layer and in total, as data."""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from ..exports import json_text, pandas

__all__ = ["CompressionReport", "LayerReport", "peak_memory"]


def peak_memory() -> int | None:
    """Peak resident memory of this process so far, in bytes (None where it cannot be read)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)


def _tokens_note(layer: LayerReport) -> str:
    if layer.calibration_tokens is None:
        return ""
    if layer.calibration_tokens == 0:
        return "no calibration token was routed to this expert: whitened by its siblings' statistics"
    return f"{layer.calibration_tokens} calibration tokens routed"


def _breakeven(layer: "LayerReport") -> float:
    m, n = layer.shape
    return m * n / (m + n)


def _memory_note(peak: int | None) -> str:
    return f", peak memory {peak / 2**30:.2f} GiB" if peak else ""


def _refinement_totals(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """Block refinement over all blocks: blocks changed, epochs, mean held-out error before and after."""
    mean = lambda key: sum(b[key] for b in blocks) / len(blocks)  # noqa: E731
    return {"blocks": len(blocks), "blocks_changed": sum(b["best_epoch"] > 0 for b in blocks),
            "epochs": sum(b["epochs"] for b in blocks), "held_out_before": mean("held_out_before"),
            "held_out_after": mean("held_out_after"), "train_before": mean("train_before"), "train_after": mean("train_after")}


@dataclass
class LayerReport:
    """One target layer.

    Attributes
    ----------
    name, kind : str
        Dotted module name; view kind (``"linear"``, ``"conv1d"``, ``"conv2d"``, ``"embedding"``).
    shape : tuple of int
        The weight matrix (rows, cols) per group.
    groups : int
    rank : int or None
        Kept rank per group; None when the layer stayed dense.
    params_before, params_after : int
        Weight parameters (biases excluded; they are unchanged).
    macs_before, macs_after : int
        Multiply-adds per input vector (per token, or per output pixel of a convolution).
    predicted_error : float or None
        Relative error predicted from the (transformed) spectrum: for ``whiten`` the relative
        output error on the calibration data, for ``svd`` the relative weight error.
    method : str
        The method that produced the factors (may differ from the requested one after a fallback).
    skip_reason : str
        Why the layer stayed dense, or why the method fell back; empty otherwise.
    calibration_tokens : int or None
        For a mixture's expert: the calibration tokens routed to it (None for other layers).
    speed_cap : int or None
        For a speed-aware compression: the largest rank at which the layer, factorized, runs
        faster than dense on the target device (0: none); None when not measured.
    """

    name: str
    kind: str
    shape: tuple[int, int]
    groups: int = 1
    rank: int | None = None
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    predicted_error: float | None = None
    method: str = ""
    skip_reason: str = ""
    calibration_tokens: int | None = None
    speed_cap: int | None = None

    @property
    def compressed(self) -> bool:
        return self.rank is not None

    @property
    def expert(self) -> bool:
        """Whether the layer is one of a mixture's experts."""
        return self.calibration_tokens is not None


@dataclass
class CompressionReport:
    """Per-layer rows and totals of one compression.

    Attributes
    ----------
    layers : list of LayerReport
    method : str
        The requested method.
    model_params_before, model_params_after : int
        Parameters of the whole model.
    seconds : float
        Wall time of the compression.
    pipeline : {"model", "blocks"}
        Which pipeline ran: the whole model at once, or block by block.
    timings : dict of str -> float
        Wall time of the stages (the block pipeline's ``"curvature"`` and ``"compression"``).
    peak_memory : int or None
        Peak resident memory of the process at the end of the compression, in bytes (the
        accelerator's peak allocation is in ``timings`` when one was used).
    quality : dict
        Optional quality figures filled in by the caller (e.g. mean cosine on held-out text).
    refinement : list of dict
        Block refinement's record of each block (:class:`svdkit.compression.refine.BlockRefinement`:
        held-out and training errors before and after, epochs, why it stopped); empty without it.
    speed : dict
        Optional speed figures filled in by the caller: a causal LM's decode tokens/s and
        prefill time against the dense model (:func:`svdkit.speed.generation_speed`), e.g.
        ``{"decode b1 x": 1.12, "prefill x": 1.05, ...}``.
    """

    layers: list[LayerReport] = field(default_factory=list)
    method: str = ""
    model_params_before: int = 0
    model_params_after: int = 0
    seconds: float = 0.0
    pipeline: str = "model"
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory: int | None = None
    quality: dict[str, Any] = field(default_factory=dict)
    refinement: list[dict[str, Any]] = field(default_factory=list)
    speed: dict[str, Any] = field(default_factory=dict)

    @property
    def target_params_before(self) -> int:
        return sum(layer.params_before for layer in self.layers)

    @property
    def target_params_after(self) -> int:
        return sum(layer.params_after for layer in self.layers)

    @property
    def kept_fraction(self) -> float:
        """Parameters of the targeted layers kept, as a fraction."""
        return self.target_params_after / max(self.target_params_before, 1)

    def totals(self) -> dict[str, Any]:
        """Summary numbers (with ``expert_params_before`` / ``_after`` when experts were targeted)."""
        experts = [layer for layer in self.layers if layer.expert]
        split = {}
        if experts:
            split = {"expert_layers": len(experts), "expert_params_before": sum(layer.params_before for layer in experts),
                     "expert_params_after": sum(layer.params_after for layer in experts)}
        capped = [layer for layer in self.layers if layer.speed_cap is not None]
        if capped:
            split["speed_capped_layers"] = len(capped)
            split["dense_for_speed"] = sum(layer.rank is None and layer.speed_cap < _breakeven(layer) for layer in capped)
        return {
            "layers": len(self.layers),
            "compressed": sum(layer.compressed for layer in self.layers),
            "target_params_before": self.target_params_before,
            "target_params_after": self.target_params_after,
            "target_kept_fraction": self.kept_fraction,
            "macs_before": sum(layer.macs_before for layer in self.layers),
            "macs_after": sum(layer.macs_after for layer in self.layers),
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
            "model_kept_fraction": self.model_params_after / max(self.model_params_before, 1),
            "seconds": self.seconds,
            "pipeline": self.pipeline,
            "timings": dict(self.timings),
            "peak_memory": self.peak_memory,
            **split,
            **({"refinement": _refinement_totals(self.refinement)} if self.refinement else {}),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``{"method", "layers": [...], "totals": {...}, "quality": {...}}``."""
        return {
            "method": self.method,
            "layers": [dict(asdict(layer), shape=list(layer.shape)) for layer in self.layers],
            "totals": self.totals(),
            "quality": dict(self.quality),
            **({"refinement": list(self.refinement)} if self.refinement else {}),
            "speed": dict(self.speed),
        }

    def to_json(self, path: str | os.PathLike | None = None, *, indent: int = 2) -> str:
        """JSON text of :meth:`to_dict`; written to ``path`` when given."""
        return json_text(self.to_dict(), path, indent=indent)

    def to_pandas(self):
        """A ``pandas.DataFrame``, one row per layer (the fields of :class:`LayerReport`).

        Raises
        ------
        ImportError
            Without pandas.
        """
        return pandas().DataFrame.from_records([asdict(layer) for layer in self.layers])

    def to_table(self) -> str:
        """A plain-text table, one row per layer and a total row."""
        header = ("layer", "shape", "rank", "params", "kept", "pred. err", "method", "note")
        rows = []
        for layer in self.layers:
            rows.append((
                layer.name,
                "x".join(map(str, layer.shape)) + (f" x{layer.groups}g" if layer.groups > 1 else ""),
                "dense" if layer.rank is None else str(layer.rank),
                f"{layer.params_after:,}",
                f"{layer.params_after / max(layer.params_before, 1):.0%}",
                "" if layer.predicted_error is None else f"{layer.predicted_error:.3f}",
                layer.method,
                "; ".join(n for n in (layer.skip_reason, _tokens_note(layer)) if n),
            ))
        t = self.totals()
        rows.append((
            f"total ({t['compressed']}/{t['layers']} factorized)", "", "",
            f"{t['target_params_after']:,}", f"{t['target_kept_fraction']:.0%}", "", self.method,
            f"model {t['model_params_before']:,} -> {t['model_params_after']:,} params in {self.seconds:.1f} s "
            f"({self.pipeline} pipeline{_memory_note(self.peak_memory)})",
        ))
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        sep = "  ".join("-" * w for w in widths)
        body = [line(header), sep, *map(line, rows[:-1]), sep, line(rows[-1])]
        if self.refinement:
            r = t["refinement"]
            body.append(f"block refinement: {r['blocks_changed']} of {r['blocks']} blocks changed in {r['epochs']} epochs; "
                        f"mean held-out error of the blocks' outputs {r['held_out_before']:.4g} -> {r['held_out_after']:.4g} "
                        f"(training {r['train_before']:.4g} -> {r['train_after']:.4g})")
        if self.quality:
            body.append("quality: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in self.quality.items()))
        if self.speed:
            body.append("speed: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in self.speed.items()))
        return "\n".join(body)

    def __str__(self) -> str:
        return self.to_table()
