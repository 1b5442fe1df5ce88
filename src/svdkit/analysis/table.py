"""A small table of per-layer records: a list of dicts that converts to text, pandas, CSV and JSON.

Every table and report object of the analysis speaks the same four names: ``to_table()`` (text),
``to_dict()``, ``to_json()`` and ``to_pandas()``.
"""

from __future__ import annotations

import csv
import io
import math
import os
from typing import Any, Iterator, Sequence

import numpy as np

from ..exports import json_text, pandas
from .text import render_table

__all__ = ["AnalysisTable"]


def _plain(value: Any) -> Any:
    """A JSON-ready version of a value (NumPy scalars and arrays, tuples, NaN -> None)."""
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


class AnalysisTable:
    """Per-layer records in model order, the skipped layers, and optional per-layer spectra.

    Parameters
    ----------
    records : list of dict
        One dict per analysed layer (or layer view), all with a ``"name"`` key.
    skipped : list of (name, reason)
    spectra : list, optional
        One entry per record: that layer's eigenvalues as an ndarray, descending (for figures), or
        None.
    summary_columns : sequence of str
        Columns whose mean forms :meth:`summary`.
    meta : dict, optional
        How the table was made (method, device, timings ...).
    summary_where : str, optional
        A boolean column: :meth:`summary` averages over the records where it is true (the weight
        table's ``ww_eligible``, WeightWatcher's layer set). Default: every record.

    Notes
    -----
    Iterating gives the records; ``table[i]`` is a record, ``table["name"]`` the record of that
    layer (the first view, for Conv2d analysed both ways). :meth:`to_pandas` needs pandas.
    """

    def __init__(
        self,
        records: list[dict[str, Any]],
        skipped: list[tuple[str, str]] | None = None,
        spectra: list[np.ndarray | None] | None = None,
        summary_columns: Sequence[str] = (),
        meta: dict[str, Any] | None = None,
        *,
        summary_where: str | None = None,
    ) -> None:
        self.records = list(records)
        self.skipped = list(skipped or [])
        self.spectra = list(spectra) if spectra is not None else [None] * len(self.records)
        if len(self.spectra) != len(self.records):
            raise ValueError(f"{len(self.spectra)} spectra for {len(self.records)} records")
        self.summary_columns = tuple(summary_columns)
        self.meta = dict(meta or {})
        self.summary_where = summary_where

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records)

    def __getitem__(self, key: int | str) -> dict[str, Any]:
        if isinstance(key, str):
            for record in self.records:
                if record.get("name") == key:
                    return record
            raise KeyError(f"no layer named {key!r} in the table; layers: {', '.join(self.names[:8])}{' ...' if len(self) > 8 else ''}")
        return self.records[key]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} layers, {len(self.skipped)} skipped, columns={self.columns[:6]}...)"

    @property
    def names(self) -> list[str]:
        """Layer names, in order."""
        return [r.get("name", "") for r in self.records]

    @property
    def columns(self) -> list[str]:
        """Every column that any record has, in first-seen order."""
        seen: dict[str, None] = {}
        for record in self.records:
            for key in record:
                seen.setdefault(key, None)
        return list(seen)

    def column(self, name: str) -> list[Any]:
        """One column as a list (None where a record lacks it)."""
        if name not in self.columns:
            raise KeyError(f"no column {name!r}; columns: {', '.join(self.columns)}")
        return [r.get(name) for r in self.records]

    def spectrum(self, key: int | str) -> np.ndarray | None:
        """The eigenvalues kept for a record (by index or layer name), descending, or None."""
        index = key if isinstance(key, int) else self.names.index(self[key]["name"])
        return self.spectra[index]

    def summary(self) -> dict[str, float]:
        """Means of the summary columns, like WeightWatcher's ``get_summary``.

        Over the records selected by ``summary_where`` (all by default), leaving out values that
        are NaN or infinite (a failed fit is NaN here, where WeightWatcher averages in its -1).
        """
        rows = [r for r in self.records if self.summary_where is None or r.get(self.summary_where)]
        out = {}
        for col in self.summary_columns:
            values = [float(v) for v in (r.get(col) for r in rows) if isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(float(v))]
            if values:
                out[col] = float(np.mean(values))
        return out

    def to_table(self, columns: Sequence[str] | None = None, *, title: str | None = None) -> str:
        """Aligned plain text: the rows (default columns by table kind), the means, the verdict rule, the skips.

        Parameters
        ----------
        columns : sequence of str, optional
            Columns to show (missing ones are dropped); default
            :data:`~svdkit.analysis.text.WEIGHT_COLUMNS` or ``ACTIVATION_COLUMNS``.
        title : str, optional
        """
        return render_table(self, columns, title=title)

    def __str__(self) -> str:
        return self.to_table()

    def to_records(self) -> list[dict[str, Any]]:
        """JSON-ready copies of the records (NaN becomes None)."""
        return [_plain(r) for r in self.records]

    def to_pandas(self):
        """A ``pandas.DataFrame`` with one row per record.

        Raises
        ------
        ImportError
            Without pandas.
        """
        pd = pandas()
        return pd.DataFrame.from_records(self.records, columns=self.columns)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the spectra, JSON-ready."""
        return {
            "layers": self.to_records(),
            "summary": _plain(self.summary()),
            "skipped": [{"name": n, "reason": r} for n, r in self.skipped],
            "meta": _plain(self.meta),
        }

    def to_json(self, path: str | os.PathLike | None = None, *, indent: int = 2) -> str:
        """JSON text of :meth:`to_dict`; written to ``path`` when given."""
        return json_text(self.to_dict(), path, indent=indent)

    def to_csv(self, path: str | os.PathLike | None = None, columns: Sequence[str] | None = None, *, summary: bool = True) -> str:
        """CSV text, one row per record (lists joined by spaces), then the :meth:`summary` means as a
        row named ``(mean)`` (``summary=False`` leaves it out); written to ``path`` when given."""
        columns = list(columns) if columns is not None else self.columns
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        rows = self.to_records()
        means = self.summary() if summary else {}
        if means:
            rows.append({"name": "(mean)", **means})
        for record in rows:
            row = []
            for col in columns:
                value = record.get(col)
                if isinstance(value, list):
                    value = " ".join("" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v) for v in value)
                row.append("" if value is None else value)
            writer.writerow(row)
        text = buffer.getvalue()
        if path is not None:
            with open(path, "w", encoding="utf-8", newline="") as fh:
                fh.write(text)
        return text
