"""Figures of weight and activation spectra, drawn with matplotlib's object API.

Nothing here touches ``pyplot`` or the global backend: each function builds a
``matplotlib.figure.Figure`` (rendered by Agg when saved), so it is safe in scripts, servers and
notebooks alike. matplotlib is imported lazily (``pip install 'svdkit[plot]'``).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .tables import common_prefix

__all__ = [
    "plot_activation_spectra",
    "plot_cka",
    "plot_energy_curves",
    "plot_esd",
    "plot_metrics_by_depth",
    "save_figures",
]

_DPI = 110


def _figure(width: float, height: float, nrows: int = 1, ncols: int = 1):
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("figures need matplotlib: pip install 'svdkit[plot]'") from exc
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _short(name: str, prefix: str, limit: int = 48) -> str:
    name = name[len(prefix):] if prefix and name.startswith(prefix) else name
    return name if len(name) <= limit else "…" + name[-(limit - 1):]


def plot_esd(lam: np.ndarray, record: dict[str, Any] | None = None, *, title: str | None = None):
    """One layer's eigenvalue distribution on log-log axes, with its power-law fit.

    Parameters
    ----------
    lam : ndarray of shape (M,)
        Eigenvalues ``s**2``.
    record : dict, optional
        The layer's table record; its ``alpha``, ``xmin`` and ``ks_distance`` draw the fit.
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig, axes = _figure(5.6, 3.8)
    ax = axes[0, 0]
    x = np.asarray(lam, dtype=np.float64)
    x = x[x > 0]
    if x.size == 0:
        ax.text(0.5, 0.5, "all eigenvalues are zero", ha="center", va="center", transform=ax.transAxes)
        return fig
    lo, hi = x.min(), x.max()
    if hi <= lo * 1.0001:
        lo, hi = lo / 1.5, hi * 1.5
    bins = np.geomspace(lo, hi * 1.0001, min(60, max(10, x.size // 8)))
    ax.hist(x, bins=bins, density=True, color="#4C72B0", alpha=0.75, label=f"ESD ({x.size} eigenvalues)")
    rec = record or {}
    alpha, xmin = rec.get("alpha"), rec.get("xmin")
    if isinstance(alpha, float) and math.isfinite(alpha) and isinstance(xmin, float) and xmin > 0:
        tail = x[x >= xmin]
        grid = np.geomspace(xmin, hi, 100)
        # Power-law density on [xmin, inf), weighted by the tail's share of all eigenvalues.
        density = (alpha - 1) / xmin * (grid / xmin) ** (-alpha) * tail.size / x.size
        D = rec.get("ks_distance")
        label = f"power law  α = {alpha:.2f}" + (f", D = {D:.3f}" if isinstance(D, float) else "")
        ax.plot(grid, density, color="#C44E52", lw=2, ls="--", label=label)
        ax.axvline(xmin, color="#C44E52", lw=1, ls=":", label=f"xmin = {xmin:.3g} ({tail.size} in tail)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue λ = σ² of W  (log scale)")
    ax.set_ylabel("density  (log scale)")
    ax.set_title(title or "eigenvalue distribution", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(True, which="major", alpha=0.3)
    return fig


def plot_energy_curves(table, *, title: str = "Cumulative energy by rank"):
    """Cumulative energy ``sum_{i<=k} s_i**2 / sum s_i**2`` against ``k / M`` for every layer.

    Lines are coloured by depth (the record's position in the table).
    """
    from matplotlib import cm, colors

    fig, axes = _figure(6.4, 4.2)
    ax = axes[0, 0]
    spectra = [(i, s) for i, s in enumerate(table.spectra) if s is not None and s.size]
    norm = colors.Normalize(0, max(1, len(table) - 1))
    cmap = cm.viridis
    for i, lam in spectra:
        total = lam.sum()
        if total <= 0:
            continue
        curve = np.concatenate([[0.0], np.cumsum(lam) / total])
        ax.plot(np.linspace(0, 1, curve.size), curve, color=cmap(norm(i)), lw=1.1, alpha=0.85)
    for level in (0.9, 0.99):
        ax.axhline(level, color="0.35", lw=0.8, ls="--")
        ax.text(1.0, level, f" {level:.0%}", va="center", ha="left", fontsize=8, color="0.25")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("rank kept, as a fraction of min(out, in)")
    ax.set_ylabel("share of energy ‖W‖²_F kept")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    bar = fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax)
    bar.set_label("layer index (depth)")
    return fig


_DEPTH_METRICS = (
    ("alpha", "power-law α of the ESD"),
    ("stable_rank", "stable rank  ‖W‖²_F / ‖W‖²₂"),
    ("effective_rank", "effective rank  exp H(σ/Σσ)"),
    ("log_spectral_norm", "log10 λ_max = 2·log10 ‖W‖₂"),
)


def plot_metrics_by_depth(table, metrics: Sequence[tuple[str, str]] = _DEPTH_METRICS, *, title: str = "Metrics by depth"):
    """Selected metrics against layer index, one panel each, marker shape by layer kind."""
    from matplotlib.ticker import MaxNLocator

    present = [(m, label) for m, label in metrics if m in table.columns]
    ncols = 2 if len(present) > 1 else 1
    nrows = max(1, math.ceil(len(present) / ncols))
    fig, axes = _figure(10 if ncols == 2 else 5.5, 3.0 * nrows + 0.6, nrows, ncols)
    kinds = sorted({r.get("kind", "") for r in table})
    markers = dict(zip(kinds, "osD^v<>p*h"))
    idx = np.arange(len(table))
    for k, (metric, label) in enumerate(present):
        ax = axes[k // ncols, k % ncols]
        values = np.array([np.nan if not isinstance(v, (int, float)) else float(v) for v in table.column(metric)])
        if metric == "alpha":
            ax.axhspan(2, 6, color="#55A868", alpha=0.12, label="2 ≤ α ≤ 6 (typical of trained layers)")
        ax.plot(idx, values, color="0.6", lw=0.8, zorder=1)
        for kind in kinds:
            sel = np.array([r.get("kind", "") == kind for r in table])
            ax.scatter(idx[sel], values[sel], marker=markers[kind], s=22, label=kind or "layer", zorder=2)
        ax.set_ylabel(label, fontsize=9)
        ax.set_xlabel("layer index (model order)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if k == 0:
            ax.legend(fontsize=8, loc="best")
    for k in range(len(present), nrows * ncols):
        axes[k // ncols, k % ncols].set_visible(False)
    fig.suptitle(title, fontsize=11)
    return fig


def plot_activation_spectra(table, *, title: str = "Representation spectra"):
    """Explained-variance ratio per principal direction (log-log), and effective rank / RankMe by layer."""
    from matplotlib import cm, colors

    fig, axes = _figure(11, 4.0, 1, 2)
    ax, ax2 = axes[0, 0], axes[0, 1]
    norm = colors.Normalize(0, max(1, len(table) - 1))
    prefix = common_prefix(table.names)
    floor = 1.0
    for i, lam in enumerate(table.spectra):
        if lam is None or lam.sum() <= 0:
            continue
        ratio = lam / lam.sum()
        # Directions with variance below 1e-8 of the largest are numerically zero (e.g. the
        # direction a LayerNorm removes); leaving them out keeps the axis readable.
        keep = ratio > ratio[0] * 1e-8
        floor = min(floor, float(ratio[keep].min()))
        ax.plot(np.arange(1, lam.size + 1)[keep], ratio[keep], color=cm.viridis(norm(i)), lw=1.2,
                label=_short(table.names[i], prefix, 28))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("principal direction (rank order, log scale)")
    ax.set_ylabel("explained variance ratio (log scale)")
    ax.set_ylim(bottom=floor / 2)
    ax.set_title("covariance spectrum per layer", fontsize=10)
    ax.grid(True, alpha=0.3)
    if len(table) <= 12:
        ax.legend(fontsize=7, title="layer", title_fontsize=8)
    idx = np.arange(len(table))
    ax2.plot(idx, table.column("effective_rank"), "o-", label="effective rank (variance entropy)")
    ax2.plot(idx, table.column("rankme"), "s-", label="RankMe (singular-value entropy)")
    ax2.plot(idx, table.column("dims_90"), "^--", label="dimensions for 90 % variance")
    ax2.set_xticks(idx)
    ax2.set_xticklabels([_short(n, prefix, 18) for n in table.names], rotation=45, ha="right", fontsize=7)
    ax2.set_ylabel("dimensions")
    ax2.set_title("rank of the representation by layer", fontsize=10)
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    return fig


def plot_cka(matrix: Sequence[Sequence[float]], layers: Sequence[str], *, title: str = "Linear CKA between layers"):
    """Heatmap of a CKA matrix with its values written in each cell."""
    M = np.asarray(matrix, dtype=np.float64)
    n = len(layers)
    size = min(9.0, 2.5 + 0.55 * n)
    fig, axes = _figure(size + 1.2, size)
    ax = axes[0, 0]
    image = ax.imshow(M, vmin=0, vmax=1, cmap="magma")
    prefix = common_prefix(list(layers))
    labels = [_short(name, prefix, 22) for name in layers]
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticklabels(labels, fontsize=8)
    if n <= 16:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{M[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if M[i, j] < 0.6 else "black")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="CKA (1 = same up to rotation and scale)")
    return fig


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:80] or "layer"


def save_figures(
    directory: str | os.PathLike,
    weights=None,
    activations=None,
    *,
    max_esd: int | None = None,
) -> dict[str, Path]:
    """Write every figure as a PNG into ``directory``.

    Parameters
    ----------
    directory : str or PathLike
        Created if needed.
    weights : AnalysisTable, optional
        A weight table: one ``esd_NNN_<layer>.png`` per layer (up to ``max_esd``), plus
        ``energy_curves.png`` and ``metrics_by_depth.png``.
    activations : AnalysisTable, optional
        An activation table: ``activation_spectra.png`` and, with CKA, ``cka.png``.
    max_esd : int, optional
        Most per-layer ESD figures to draw (default: all).

    Returns
    -------
    dict of figure name -> path, in drawing order
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}

    def save(name: str, fig) -> None:
        path = out / f"{name}.png"
        fig.savefig(path, dpi=_DPI)
        written[name] = path

    if weights is not None:
        save("metrics_by_depth", plot_metrics_by_depth(weights))
        save("energy_curves", plot_energy_curves(weights))
        prefix = common_prefix(weights.names)
        for i, record in enumerate(weights):
            if max_esd is not None and i >= max_esd:
                break
            lam = weights.spectra[i]
            if lam is None:
                continue
            view = "" if record.get("view", "matrix") == "matrix" else f" [{record['view']}]"
            title = f"{_short(record['name'], prefix)}{view}  ({record.get('rows')}×{record.get('cols')})"
            save(f"esd_{i:03d}_{_slug(record['name'])}{'_slices' if view else ''}", plot_esd(lam, record, title=title))
    if activations is not None:
        save("activation_spectra", plot_activation_spectra(activations))
        cka = activations.meta.get("cka")
        if cka:
            save("cka", plot_cka(cka["matrix"], cka["layers"]))
    return written
