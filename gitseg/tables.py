"""Plain-text tables for the terminal (leaderboards, summaries)."""

from __future__ import annotations


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
