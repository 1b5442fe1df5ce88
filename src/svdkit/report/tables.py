"""Analysis tables in a terminal: ``rich`` (colours, borders) when it is installed, plain text otherwise.

The plain text is :meth:`AnalysisTable.to_table() <svdkit.analysis.table.AnalysisTable.to_table>`;
the cell formatting and default columns come from :mod:`svdkit.analysis.text` and are re-exported
here for the figures and the HTML report.
"""

from __future__ import annotations

import sys
from typing import IO, Sequence

from ..analysis.text import (
    ACTIVATION_COLUMNS,
    COLUMN_LABELS,
    WEIGHT_COLUMNS,
    common_prefix,
    default_columns,
    footer_lines,
    format_value,
    table_rows,
)

__all__ = [
    "ACTIVATION_COLUMNS",
    "COLUMN_LABELS",
    "WEIGHT_COLUMNS",
    "common_prefix",
    "format_value",
    "print_table",
]


def print_table(table, columns: Sequence[str] | None = None, *, title: str | None = None, file: IO[str] | None = None) -> None:
    """Print an :class:`~svdkit.analysis.table.AnalysisTable`: with ``rich`` when it is installed, else as
    :meth:`~svdkit.analysis.table.AnalysisTable.to_table` text. Rows the verdict calls ``keep_dense``
    are yellow."""
    file = file or sys.stdout
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table
    except ImportError:
        file.write(table.to_table(columns, title=title) + "\n")
        return
    headers, rows, prefix = table_rows(table, columns or default_columns(table))
    caption = escape("\n".join(footer_lines(table)))  # "[x x^T]" is text, not rich markup
    heading = escape((title or "") + (f"\nnames start with {prefix!r}" if prefix else ""))
    grid = Table(title=heading, caption=caption or None, header_style="bold", caption_justify="left")
    for i, header in enumerate(headers):
        grid.add_column(escape(header), justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in rows:
        style = "yellow" if row and "keep_dense" in row else None
        grid.add_row(*(escape(cell) for cell in row), style=style)
    Console(file=file, width=200 if not file.isatty() else None).print(grid)
