"""Rows of dicts as text: terminal tables, CSV, and short labels for configuration values."""

from __future__ import annotations

import csv
import io


def label(value) -> str:
    """A short label for a configuration value: a loss mix as `bce:0.5+dice:0.5`, floats to 3 digits."""
    if isinstance(value, list):
        return "+".join(f"{v['name']}:{v['weight']:g}" if isinstance(v, dict) else str(v) for v in value)
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def format_table(rows: list[dict], floats: str = "{:.3f}") -> str:
    """A plain-text table of dict rows (same keys), for the terminal."""
    if not rows:
        return "(empty)"
    keys = list(rows[0])
    cells = [[floats.format(r[k]) if isinstance(r[k], float) else str(r[k]) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]

    def line(values):
        return "  ".join(v.rjust(w) for v, w in zip(values, widths))

    return "\n".join([line(keys), line(["-" * w for w in widths]), *map(line, cells)])


def csv_text(rows: list[dict], columns=None) -> str:
    """CSV of dict rows: a header of `columns` (default: the first row's keys), keys not in it left out."""
    columns = list(columns if columns is not None else (rows[0] if rows else []))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
