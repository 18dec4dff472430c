"""How a report is rendered: sections, text, tables and figures collected in order, then written
together as `index.html` (figures beside it, nothing fetched from anywhere), `report.md` and one
CSV per table under `tables/`. What a report says is decided in ensemble/report/report.py.
"""

from __future__ import annotations

import html
import math
import shutil
from pathlib import Path

from gitseg.tables import csv_text


def _fmt(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else ("inf" if math.isinf(value) else f"{value:.4f}")
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "_(none)_\n"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k, "")).replace("|", "\\|") for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def html_table(rows: list[dict]) -> str:
    if not rows:
        return "<p><em>(none)</em></p>"
    keys = list(rows[0])
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(k, '')))}</td>" for k in keys) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class Report:
    """Collects sections; writes HTML, Markdown and CSV together."""

    def __init__(self, out: Path, title: str):
        self.out, self.title = out, title
        self.parts: list[tuple[str, str, object]] = []  # (kind, heading or name, payload)
        (out / "figures").mkdir(parents=True, exist_ok=True)
        (out / "tables").mkdir(parents=True, exist_ok=True)

    def section(self, heading: str) -> None:
        self.parts.append(("section", heading, None))

    def text(self, text: str) -> None:
        self.parts.append(("text", "", text))

    def table(self, name: str, rows: list[dict], caption: str = "") -> None:
        text = csv_text([{k: _fmt(v) for k, v in r.items()} for r in rows]) if rows else ""
        (self.out / "tables" / f"{name}.csv").write_text(text)
        self.parts.append(("table", caption or name, rows))

    def figure(self, fig, name: str, caption: str) -> None:
        import matplotlib.pyplot as plt  # heavy: only a report with figures needs it

        fig.savefig(self.out / "figures" / f"{name}.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        self.parts.append(("figure", caption, f"figures/{name}.png"))

    def image(self, path: Path, name: str, caption: str) -> None:
        """A figure drawn elsewhere (a PNG file), copied into the report's folder."""
        shutil.copyfile(path, self.out / "figures" / f"{name}.png")
        self.parts.append(("figure", caption, f"figures/{name}.png"))

    def write(self) -> None:
        md = [f"# {self.title}\n"]
        body = [f"<h1>{html.escape(self.title)}</h1>", "<nav>"]
        body += [f'<a href="#s{i}">{html.escape(h)}</a>' for i, (k, h, _) in enumerate(self.parts) if k == "section"]
        body.append("</nav>")
        for i, (kind, heading, payload) in enumerate(self.parts):
            if kind == "section":
                md.append(f"\n## {heading}\n")
                body.append(f'<h2 id="s{i}">{html.escape(heading)}</h2>')
            elif kind == "text":
                md.append(f"{payload}\n")
                body.append(f"<p>{html.escape(payload)}</p>")
            elif kind == "table":
                md.append(f"**{heading}**\n\n{markdown_table(payload)}")
                body.append(f"<h3>{html.escape(heading)}</h3>{html_table(payload)}")
            else:
                md.append(f"![{heading}]({payload})\n")
                body.append(f'<figure><img src="{payload}" alt="{html.escape(heading)}">'
                            f"<figcaption>{html.escape(heading)}</figcaption></figure>")
        style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
                 "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
                 "font-size:13px;text-align:right}th{background:#f0f0f0}nav a{margin-right:1em}"
                 "img{max-width:100%}figcaption{font-size:13px;color:#555}h2{border-bottom:1px solid #ddd}")
        page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{style}</style></head><body>{''.join(body)}</body></html>")
        (self.out / "index.html").write_text(page)
        (self.out / "report.md").write_text("\n".join(md))
