"""`gitseg robustness`: the entry point over `run_robustness`.

Part of the CLI layer (docs/ARCHITECTURE.md): the stage is imported when the command runs.
"""

from __future__ import annotations

from pathlib import Path

from gitseg.arguments import add_verbose, log_in
from gitseg.progress import say


def robustness_command(args) -> None:
    from ensemble.robustness.robustness import CORRUPTIONS, run_robustness, table_text

    result = run_robustness(args.ensemble, cache_dir=args.cache, out=args.out,
                            corruptions=args.corruptions or CORRUPTIONS, severities=args.severities or (1, 2, 3),
                            data_root=args.data, seed=args.seed)
    say(table_text(result))


def add_commands(sub) -> None:
    p = sub.add_parser("robustness", help="score an ensemble's holdout under MRI corruptions (bias field, noise, "
                                          "motion, ghosting, spike, blur, lower resolution, gamma), 3 severities each")
    p.add_argument("--ensemble", required=True, help="ensemble folder made by `gitseg ensemble` or `gitseg distill`")
    p.add_argument("--cache", default=None, help="prepared cache whose holdout is scored (default: the ensemble's)")
    p.add_argument("--data", default=None, help="the data set of the raw scans (default: the one the cache was "
                                                "prepared from)")
    p.add_argument("--out", default=None, help="output folder (default ENSEMBLE/robustness; `gitseg report` shows it)")
    p.add_argument("--corruptions", nargs="+", default=None, metavar="NAME", help="a subset (default: all)")
    p.add_argument("--severities", nargs="+", type=int, default=None, help="a subset of 1 2 3 (default: all)")
    p.add_argument("--seed", type=int, default=0)
    add_verbose(p)
    p.set_defaults(func=robustness_command,
                   log=lambda args: log_in(args.out or Path(args.ensemble, "robustness"), "robustness"))
