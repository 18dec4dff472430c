"""`gitseg search` and `gitseg replay`: the entry points over `run_search` and `replay_report`.

Part of the CLI layer (docs/ARCHITECTURE.md): the stage is imported when a command runs, so that
`gitseg --help` does not import torch or Ray.
"""

from __future__ import annotations

from pathlib import Path

from gitseg.arguments import add_verbose


def search_command(args) -> None:
    from search.run import run_search
    from search.settings import load_search_config

    run_search(load_search_config(args.config, args.set))


def search_log(args) -> Path:
    """The search's log: in its folder, or beside the driver when the folder is an object store."""
    from search.settings import load_search_config

    settings = load_search_config(args.config, args.set)
    if "://" in settings.storage_path:
        return Path(f"{settings.name}-search.log").resolve()
    return Path(settings.storage_path, settings.name, "search.log").resolve()


def replay_command(args) -> None:
    from search.replay import replay_report

    replay_report(args.file, metric=args.metric, grace=args.grace, rf=args.rf, max_t=args.max_t, check=args.check,
                  brackets=args.brackets, anytime=args.anytime)


def add_commands(sub) -> None:
    p = sub.add_parser("search", help="distributed search (Ray Tune + Optuna + ASHA), then refit over folds")
    p.add_argument("--config", required=True, help="search config YAML (see configs/search_demo.yaml)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a search setting")
    add_verbose(p)
    p.set_defaults(func=search_command, log=search_log)

    p = sub.add_parser("replay", help="replay ASHA's rules (grace period, reduction factor, brackets) on the "
                                      "learning curves of a search without early stopping")
    p.add_argument("file", help="search.json of a search run with asha.enabled: false, or a bench_asha.py --save file")
    p.add_argument("--metric", default=None, help="rung metric (default: every recorded one)")
    p.add_argument("--grace", type=int, nargs="+", default=[1, 2], help="grace periods to replay (default 1 2)")
    p.add_argument("--rf", type=int, nargs="+", default=[3, 4], help="reduction factors to replay (default 3 4)")
    p.add_argument("--max-t", type=int, default=None, help="epochs per trial (default: the recorded ones)")
    p.add_argument("--check", action="store_true", help="first reproduce the recorded ASHA arm (bench_asha.py files)")
    p.add_argument("--brackets", type=int, default=None, metavar="MOST",
                   help="also replay 1..MOST brackets of Ray's multi-bracket ASHA at the first --grace and --rf "
                        "(each trial's bracket drawn as Ray draws it; means over 400 seeded draws)")
    p.add_argument("--anytime", type=float, default=None, metavar="SHARE",
                   help="also: the best score once SHARE of the trial-epochs are spent, in the recorded order and "
                        "over 2,000 seeded random orders of the configurations (the first kept first), with ASHA "
                        "at the first --grace and --rf and without early stopping")
    p.set_defaults(func=replay_command, log=None)
