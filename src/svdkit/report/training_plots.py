"""Figures of training dynamics: tracked metrics against step, and the trajectory spectrum.

matplotlib is imported lazily with the non-interactive Agg backend (``pip install 'svdkit[plot]'``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["METRIC_LABELS", "plot_spectral_history", "plot_trajectory"]

#: Axis label of each tracked metric (all are dimensionless ratios or in the weights' units).
METRIC_LABELS = {
    "sigma_max": r"$\sigma_{\max}$ (spectral norm)",
    "frobenius_norm": r"$\|W\|_F$",
    "stable_rank": r"stable rank $\|W\|_F^2/\sigma_{\max}^2$",
    "nuclear_norm": r"nuclear norm $\sum_i \sigma_i$",
    "condition_number": r"condition number $\sigma_{\max}/\sigma_{\min}$",
    "effective_rank": r"effective rank $e^{H(\sigma/\sum\sigma)}$",
}
_LOG_METRICS = {"condition_number"}


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("figures need matplotlib: pip install matplotlib (or pip install 'svdkit[plot]')") from exc
    if matplotlib.get_backend().lower() != "agg":
        matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _few_decades(ax) -> bool:
    low, high = ax.get_ylim()
    return low > 0 and high / low < 30


def _save(fig, path: str | os.PathLike | None) -> None:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")


def plot_spectral_history(
    history,
    path: str | os.PathLike | None = None,
    *,
    metrics: Sequence[str] | None = None,
    layers: Sequence[str] | None = None,
    title: str | None = None,
):
    """Each tracked metric against step, one panel per metric and one line per layer.

    Parameters
    ----------
    history : TrackerHistory, or str / PathLike of a tracker CSV
    path : str or PathLike, optional
        Where to save a PNG.
    metrics, layers : sequence of str, optional
        Subsets to draw; default everything in the history.
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure

    Notes
    -----
    Metrics computed on a slower cadence than the others (fast mode's full-spectrum metrics)
    are drawn with markers at the steps where they exist. Condition numbers use a log axis.
    """
    from ..analysis.training.sinks import TrackerHistory, read_tracker_csv

    if not isinstance(history, TrackerHistory):
        history = read_tracker_csv(history)
    if len(history) == 0:
        raise ValueError("the history has no records to plot")
    metrics = list(metrics) if metrics is not None else list(history.metrics)
    layers = list(layers) if layers is not None else list(history.layers)
    for name in layers:
        if name not in history.layers:
            raise KeyError(f"no layer {name!r} in the history; layers: {history.layers}")
    plt = _pyplot()
    ncols = min(3, len(metrics))
    nrows = -(-len(metrics) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows), squeeze=False, sharex=True)
    colors = plt.get_cmap("tab10" if len(layers) <= 10 else "tab20")
    n_records = len(history)
    for ax, metric in zip(axes.flat, metrics):
        for i, layer in enumerate(layers):
            steps, values = history.series(layer, metric)
            sparse = len(values) < 0.5 * n_records
            ax.plot(steps, values, color=colors(i % colors.N), lw=1.4, label=layer,
                    marker="o" if sparse else None, ms=3)
        ax.set_title(metric.replace("_", " "), fontsize=10)
        ax.set_ylabel(METRIC_LABELS.get(metric, metric), fontsize=9)
        if metric in _LOG_METRICS:
            from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_locator(LogLocator(subs="all"))
            ax.yaxis.set_minor_formatter(ScalarFormatter() if _few_decades(ax) else NullFormatter())
        ax.grid(True, alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("training step (optimizer steps)")
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, title="layer", loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
    return fig


def plot_trajectory(analysis, path: str | os.PathLike | None = None, *, title: str | None = None):
    """The spectrum of the step-to-step updates, its cumulative energy, and the gradient overlap.

    Parameters
    ----------
    analysis : TrajectoryAnalysis
        From :meth:`svdkit.analysis.training.TrajectoryRecorder.analyze`.
    path : str or PathLike, optional
        Where to save a PNG.
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    plt = _pyplot()
    panels = 3 if len(analysis.overlaps) else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.8 * panels, 3.6))
    S = np.asarray(analysis.singular_values)
    k = np.arange(1, len(S) + 1)
    space = f"sketched to {analysis.dim} dims" if analysis.projected else f"{analysis.n_params} parameters"
    ax = axes[0]
    positive = S > 0
    ax.semilogy(k[positive], S[positive], "o-", ms=3, lw=1.2)
    ax.set_xlabel("direction k")
    ax.set_ylabel(r"singular value $\sigma_k$ of the update matrix")
    ax.set_title(f"update spectrum ({len(S)} updates, {space})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax = axes[1]
    ax.plot(k, analysis.explained, "o-", ms=3, lw=1.2, color="C1")
    for frac, dims, style in ((0.9, analysis.dims_90, "--"), (0.99, analysis.dims_99, ":")):
        ax.axhline(frac, color="grey", ls=style, lw=1)
        ax.axvline(dims, color="grey", ls=style, lw=1, label=f"{frac:.0%} in {dims} directions")
    ax.set_xlabel("directions k")
    ax.set_ylabel("fraction of movement (energy) explained")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"effective directions {analysis.effective_directions:.1f}", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, alpha=0.3)
    if panels == 3:
        ax = axes[2]
        ax.plot(analysis.overlap_steps, analysis.overlaps, ".-", ms=3, lw=1, color="C2", label="gradient")
        chance = min(analysis.top_k, len(S)) / analysis.dim
        ax.axhline(chance, color="grey", ls="--", lw=1, label=f"random direction ({chance:.2g})")
        ax.legend(fontsize=8, loc="upper right")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("training step (optimizer steps)")
        ax.set_ylabel(r"$\|P_k g\|^2 / \|g\|^2$")
        ax.set_title(f"gradient in top-{analysis.top_k} update subspace", fontsize=10)
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
    return fig
