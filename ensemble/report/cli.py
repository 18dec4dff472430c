"""`gitseg report`: the entry point over `build_report`.

Part of the CLI layer (docs/ARCHITECTURE.md): the stage is imported when the command runs.
"""

from __future__ import annotations

from pathlib import Path

from gitseg.arguments import add_verbose, log_in


def report_command(args) -> None:
    from ensemble.report.report import build_report

    build_report(args.run, ensemble_dir=args.ensemble, out=args.out)


def add_commands(sub) -> None:
    p = sub.add_parser("report", help="static HTML/Markdown/CSV report of a search and its ensemble")
    p.add_argument("--run", required=True, help="search folder: <storage_path>/<name>")
    p.add_argument("--ensemble", default=None, help="ensemble folder (default RUN/ensemble when present)")
    p.add_argument("--out", default=None, help="report folder (default RUN/report)")
    add_verbose(p)
    p.set_defaults(func=report_command, log=lambda args: log_in(args.out or Path(args.run, "report"), "report"))
