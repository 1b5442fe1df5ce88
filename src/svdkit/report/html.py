"""A self-contained HTML report: summary, per-layer tables and every figure embedded as base64 PNG."""

from __future__ import annotations

import base64
import datetime
import html
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

from .tables import ACTIVATION_COLUMNS, COLUMN_LABELS, WEIGHT_COLUMNS, common_prefix, format_value

__all__ = ["render_html", "write_html"]

_STYLE = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.meta{color:#666;font-size:.9em}
table{border-collapse:collapse;font-size:.82em;margin:.8em 0}
th,td{padding:3px 8px;border-bottom:1px solid #eee;text-align:right;white-space:nowrap}
th{background:#f5f5f5;position:sticky;top:0}td:first-child,th:first-child{text-align:left}
tr:hover td{background:#fafafa}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{background:#f7f7fb;border-radius:6px;padding:8px 14px}
.card b{display:block;font-size:1.3em}.card span{color:#666;font-size:.8em}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:10px}
.grid img{width:100%}.scroll{overflow-x:auto;max-height:640px}
.bad{color:#b03030}
"""

_CARD_LABELS = {
    "alpha": "mean α (power-law exponent)", "alpha_weighted": "mean α-weighted", "log_norm": "mean log10 Σλ",
    "log_spectral_norm": "mean log10 λmax", "stable_rank": "mean stable rank", "log_alpha_norm": "mean log α-norm",
    "effective_rank": "mean effective rank", "rank_90_fraction": "mean rank90 / M", "mp_softrank": "mean MP soft rank",
    "rankme": "mean RankMe", "dims_90": "mean dims for 90 %", "dims_99": "mean dims for 99 %",
    "cum_var_10": "mean variance in top 10",
}


def _img(path_or_bytes: Path | bytes, alt: str) -> str:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _cards(summary: dict[str, float]) -> str:
    cells = "".join(f'<div class="card"><b>{format_value(v)}</b><span>{html.escape(_CARD_LABELS.get(k, k))}</span></div>'
                    for k, v in summary.items())
    return f'<div class="cards">{cells}</div>'


def _table_html(table, columns: Sequence[str]) -> str:
    present = [c for c in columns if c in table.columns]
    prefix = common_prefix(table.names)
    head = "".join(f"<th>{html.escape(COLUMN_LABELS.get(c, c))}</th>" for c in present)
    rows = []
    for record in table:
        cells = []
        for c in present:
            value = record.get(c)
            if c == "name":
                value = value[len(prefix):] + ("" if record.get("view", "matrix") == "matrix" else f" [{record['view']}]")
            cls = ' class="bad"' if c == "verdict" and value == "keep_dense" else ""
            cells.append(f"<td{cls}>{html.escape(format_value(value))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    note = f'<p class="meta">Layer names start with <code>{html.escape(prefix)}</code>.</p>' if prefix else ""
    return f'{note}<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def _skipped(table) -> str:
    if not table.skipped:
        return ""
    items = "".join(f"<li><code>{html.escape(n)}</code>: {html.escape(r)}</li>" for n, r in table.skipped[:50])
    more = f"<li>… and {len(table.skipped) - 50} more</li>" if len(table.skipped) > 50 else ""
    return f"<details><summary>{len(table.skipped)} skipped tensor(s)</summary><ul>{items}{more}</ul></details>"


def render_html(
    weights=None,
    activations=None,
    figures: dict[str, Any] | None = None,
    *,
    title: str = "svdkit spectral report",
    subtitle: str = "",
) -> str:
    """The report as one HTML string with every image inlined (no external files).

    Parameters
    ----------
    weights, activations : AnalysisTable, optional
    figures : dict of name -> PNG path or bytes, optional
        As returned by :func:`svdkit.report.figures.save_figures`. ``esd_*`` figures go in a grid.
    title, subtitle : str
    """
    figures = figures or {}
    parts = [f"<h1>{html.escape(title)}</h1>",
             f'<p class="meta">{html.escape(subtitle)} · generated {datetime.datetime.now():%Y-%m-%d %H:%M}</p>']
    if weights is not None:
        seconds = weights.meta.get("seconds")
        parts.append("<h2>Weights</h2>")
        parts.append(f'<p class="meta">{len(weights)} matrices analysed'
                     + (f" in {seconds:.2f} s" if isinstance(seconds, float) else "")
                     + f' · eigenvalues via <code>{html.escape(str(weights.meta.get("eigen_route", "")))}</code>.'
                     " α is the power-law exponent of the eigenvalue distribution λ = σ² (WeightWatcher's fit);"
                     " α between 2 and 6 is typical of well-trained layers, larger values look random.</p>")
        parts.append(_cards(weights.summary()))
        for name in ("metrics_by_depth", "energy_curves"):
            if name in figures:
                parts.append(f"<figure>{_img(figures[name], name)}</figure>")
        parts.append(_table_html(weights, WEIGHT_COLUMNS + ("sigma_max", "top10_energy", "rank_99_fraction", "verdict_params", "whitened_verdict_params")))
        parts.append(_skipped(weights))
        esd = [(k, v) for k, v in figures.items() if k.startswith("esd_")]
        if esd:
            parts.append("<h2>Eigenvalue distributions, one per layer</h2>"
                         '<p class="meta">Log-log histogram of λ = σ² with the fitted power law (dashed) above xmin (dotted).</p>')
            parts.append('<div class="grid">' + "".join(_img(v, k) for k, v in esd) + "</div>")
    if activations is not None:
        parts.append("<h2>Representations</h2>")
        parts.append(f'<p class="meta">{len(activations)} layers, '
                     f'{activations[0].get("samples", "?")} samples each ({html.escape(str(activations.meta.get("samples", "")))}).</p>')
        parts.append(_cards(activations.summary()))
        for name in ("activation_spectra", "cka"):
            if name in figures:
                parts.append(f"<figure>{_img(figures[name], name)}</figure>")
        parts.append(_table_html(activations, ACTIVATION_COLUMNS + ("cum_var_50",)))
    body = "\n".join(p for p in parts if p)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head><body>{body}</body></html>\n")


def write_html(
    path: str | os.PathLike,
    weights=None,
    activations=None,
    *,
    figures: dict[str, Any] | None = None,
    title: str = "svdkit spectral report",
    subtitle: str = "",
    max_esd: int | None = None,
) -> Path:
    """Write the report to ``path``; draws the figures first (in a temporary folder) unless given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if figures is None:
        from .figures import save_figures

        with tempfile.TemporaryDirectory() as tmp:
            drawn = save_figures(tmp, weights, activations, max_esd=max_esd)
            text = render_html(weights, activations, {k: v.read_bytes() for k, v in drawn.items()}, title=title, subtitle=subtitle)
    else:
        text = render_html(weights, activations, figures, title=title, subtitle=subtitle)
    path.write_text(text, encoding="utf-8")
    return path
