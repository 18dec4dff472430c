"""`gitseg ensemble`: the entry point over `build_ensemble`.

Part of the CLI layer (docs/ARCHITECTURE.md): the stage is imported when the command runs.
"""

from __future__ import annotations

from pathlib import Path

from gitseg.arguments import TTA_CHOICES, add_verbose, log_in
from gitseg.progress import say


def ensemble_command(args) -> None:
    from ensemble.selection.build import build_ensemble
    from ensemble.selection.evaluate import holdout_lines

    manifest = build_ensemble(args.run, topk=args.topk, out=args.out, tta=args.tta, method=args.method,
                              cache_dir=args.cache, latency_budget=args.latency_budget)
    if manifest.scores.holdout:
        say("\n".join(holdout_lines(manifest.scores.holdout)))


def add_commands(sub) -> None:
    p = sub.add_parser("ensemble", help="select refit models, tune thresholds/post-processing on OOF, "
                                        "evaluate on the holdout")
    p.add_argument("--run", required=True, help="search folder: <storage_path>/<name> with refit.json")
    p.add_argument("--topk", type=int, default=5, help="configurations to combine (default 5)")
    p.add_argument("--out", default=None, help="ensemble folder (default RUN/ensemble)")
    p.add_argument("--tta", default=None, choices=TTA_CHOICES, help="test-time augmentation (default: the refit's)")
    p.add_argument("--method", default="topk", choices=("topk", "greedy"),
                   help="topk: the best configurations by OOF score; greedy: forward selection (Caruana)")
    p.add_argument("--latency-budget", type=float, default=None, metavar="MS_PER_SLICE",
                   help="choose the best candidate ensemble (configurations, folds, TTA) whose measured inference "
                        "time on this machine's device fits this many ms per slice; replaces --method")
    p.add_argument("--cache", default=None, help="prepared cache (default: the search's data.cache)")
    add_verbose(p)
    p.set_defaults(func=ensemble_command, log=lambda args: log_in(args.out or Path(args.run, "ensemble"), "ensemble"))
