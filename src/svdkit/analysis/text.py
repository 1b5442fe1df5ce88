"""Plain-text rendering of analysis tables: cell formatting, shared name prefixes, aligned columns.

:meth:`AnalysisTable.to_table` uses it; :mod:`svdkit.report.tables` draws the same rows with
``rich`` in a terminal.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

__all__ = [
    "ACTIVATION_COLUMNS",
    "COLUMN_LABELS",
    "WEIGHT_COLUMNS",
    "common_prefix",
    "default_columns",
    "footer_lines",
    "format_value",
    "render_table",
    "summary_line",
    "table_rows",
]

#: Default columns of a weight table in the terminal (the CSV/JSON outputs hold every column).
WEIGHT_COLUMNS = (
    "name", "kind", "rows", "cols", "rank", "stable_rank", "effective_rank", "rank_90_fraction",
    "alpha", "alpha_weighted", "log_spectral_norm", "condition_number", "verdict", "whitened_verdict",
)
#: Default columns of an activation table in the terminal.
ACTIVATION_COLUMNS = (
    "name", "type", "samples", "dim", "effective_rank", "rankme", "cum_var_10", "cum_var_100", "dims_90", "dims_99",
)
#: Short headers with units, for tables and figures.
COLUMN_LABELS = {
    "rows": "out", "cols": "in", "rank": "rank", "stable_rank": "stable rank", "effective_rank": "eff. rank",
    "rank_90_fraction": "rank90/M", "rank_99_fraction": "rank99/M", "alpha": "alpha", "alpha_weighted": "alpha_w",
    "log_spectral_norm": "log10 λmax", "log_norm": "log10 Σλ", "condition_number": "cond", "verdict": "verdict",
    "whitened_verdict": "whitened", "samples": "samples", "dim": "dim", "rankme": "RankMe", "cum_var_10": "var@10",
    "cum_var_50": "var@50", "cum_var_100": "var@100", "dims_90": "dims90", "dims_99": "dims99",
    "top10_energy": "top10 energy", "sigma_max": "σmax", "sigma_min": "σmin", "mp_softrank": "MP softrank",
    "num_spikes": "spikes", "verdict_params": "params@rule", "verdict_rank": "rank@rule",
    "whitened_verdict_params": "params@rule (whitened)", "whitened_verdict_rank": "rank@rule (whitened)",
}


def format_value(value: Any) -> str:
    """A compact string for one cell: 4 significant digits, ``-`` for missing or NaN."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "x".join(format_value(v) for v in value) if all(isinstance(v, int) for v in value) else " ".join(format_value(v) for v in value[:4])
    try:  # NumPy scalars
        return format_value(value.item())
    except AttributeError:
        return str(value)


def common_prefix(names: Sequence[str]) -> str:
    """The longest dotted prefix shared by every name (``"0.model."``), or ``""``."""
    if len(names) < 2:
        return ""
    parts = [n.split(".") for n in names]
    prefix = []
    for column in zip(*parts):
        if len(set(column)) != 1:
            break
        prefix.append(column[0])
    # Never swallow a whole name, nor leave a bare index ("0" reads better as "layer.0").
    while prefix and any(len(p) <= len(prefix) or p[len(prefix)].isdigit() for p in parts):
        prefix.pop()
    return ".".join(prefix) + "." if prefix else ""


def default_columns(table) -> Sequence[str]:
    """:data:`WEIGHT_COLUMNS` for a weight table, :data:`ACTIVATION_COLUMNS` otherwise."""
    return WEIGHT_COLUMNS if "stable_rank" in table.columns else ACTIVATION_COLUMNS


def table_rows(table, columns: Sequence[str]) -> tuple[list[str], list[list[str]], str]:
    """(headers, formatted rows, stripped name prefix) of the ``columns`` the table has."""
    present = [c for c in columns if c in table.columns]
    prefix = common_prefix(table.names)
    rows = []
    for record in table:
        row = []
        for col in present:
            value = record.get(col)
            if col == "name" and isinstance(value, str):
                value = value[len(prefix):]
                if record.get("view", "matrix") != "matrix":
                    value += f" [{record['view']}]"
            row.append(format_value(value))
        rows.append(row)
    return [COLUMN_LABELS.get(c, c) for c in present], rows, prefix


def summary_line(table) -> str:
    """``mean: ...`` over the table's summary columns, or ``""``."""
    summary = table.summary()
    if not summary:
        return ""
    return "mean: " + ", ".join(f"{COLUMN_LABELS.get(k, k)} {format_value(v)}" for k, v in summary.items())


def render_table(table, columns: Sequence[str] | None = None, *, title: str | None = None) -> str:
    """Aligned plain text: title, header, rule, rows, summary means, the verdict rule, the skips."""
    headers, rows, prefix = table_rows(table, columns or default_columns(table))
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    lines = []
    if title:
        lines.append(title)
    if prefix:
        lines.append(f"(names below start with {prefix!r})")
    lines.append("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths))))
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    for line in footer_lines(table):
        lines.append(line)
    return "\n".join(lines)


def footer_lines(table) -> list[str]:
    """The summary means, the verdict rule and the skipped layers, as lines under a table."""
    lines = []
    footer = summary_line(table)
    if footer:
        lines.append(footer)
    rule = table.meta.get("verdict_rule")
    if rule:
        lines.append(f"verdict: {rule}")
    whitened = table.meta.get("whitened")
    if isinstance(whitened, dict) and whitened.get("rule"):
        lines.append(f"whitened verdict: {whitened['rule']}")
    if table.skipped:
        lines.append(f"skipped {len(table.skipped)}: " + "; ".join(f"{n} ({r})" for n, r in table.skipped[:5])
                     + (" ..." if len(table.skipped) > 5 else ""))
    return lines
