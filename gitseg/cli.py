"""The `gitseg` command line: one parser whose commands each stage's entry points add.

Each stage keeps its commands beside the functions they call (`<stage>/cli.py`: the arguments,
then a handler that parses, calls and prints); this module only gathers them, and runs one with
its log file and error handling. A handler imports its stage (and with it torch or Ray) when it
runs: `gitseg --help` and the data commands start fast.
"""

from __future__ import annotations

import argparse
import gc
import sys
import traceback

import ensemble.distill.cli
import ensemble.predict.cli
import ensemble.report.cli
import ensemble.robustness.cli
import ensemble.selection.cli
import gitseg.data.cli
import search.cli
from gitseg import __version__
from gitseg.arguments import add_verbose, log_in
from gitseg.progress import captured, error, say

DESCRIPTION = ("gitseg: search, ensemble and deploy segmentation models of the organs at risk in abdominal MRI "
               "(large bowel, small bowel, stomach)")
# The stages whose commands follow `train`, in the order `gitseg --help` lists them: the pipeline's.
STAGES = (search.cli, ensemble.selection.cli, ensemble.distill.cli, ensemble.predict.cli, ensemble.robustness.cli,
          ensemble.report.cli)


def train_command(args) -> None:
    from gitseg.config import load_config
    from gitseg.train import fit

    overrides = list(args.set or [])
    if args.fold is not None:
        overrides.append(f"data.fold={args.fold}")
    if args.out is not None:
        overrides.append(f"out={args.out}")
    cfg = load_config(args.config, overrides)
    best = fit(cfg)
    print(f"train: best epoch {best['epoch'] + 1} score {best['score']:.4f} (dice {best['dice']:.4f}, "
          f"hausdorff {best['hausdorff']:.4f}, {best['variant']} convention); checkpoints in {cfg.out}")


def add_train_command(sub) -> None:
    p = sub.add_parser("train", help="train one fold (the unit of work of every search trial)")
    p.add_argument("--config", default=None, help="experiment YAML (default: built-in defaults)")
    p.add_argument("--fold", type=int, default=None, help="validation fold (overrides data.fold)")
    p.add_argument("--out", default=None, help="run folder (overrides out)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.lr=3e-4")
    p.set_defaults(func=train_command, log=None)


def demo_command(args) -> None:
    from gitseg.demo import run_demo

    run_demo(out=args.out, config=args.config, trials=args.trials, epochs=args.epochs, overrides=args.set)


def add_demo_command(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on synthetic data: synth, prepare, search, refit, "
                                    "ensemble, report")
    p.add_argument("--out", default="runs/demo", help="folder for everything (default runs/demo)")
    p.add_argument("--config", default="configs/search_demo.yaml", help="search config (default %(default)s)")
    p.add_argument("--trials", type=int, default=None, help="search trials (default: configs/search_demo.yaml)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per trial (default: configs/demo.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a search config key, e.g. tracking.mlflow=true (repeatable)")
    add_verbose(p)
    p.set_defaults(func=demo_command, log=lambda args: log_in(args.out, "demo"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gitseg", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"gitseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    gitseg.data.cli.add_commands(sub)
    add_train_command(sub)
    for stage in STAGES:
        stage.add_commands(sub)
    add_demo_command(sub)
    return parser


def log_file(args):
    """Where a command's Ray, Tune and worker output goes: a file in the folder it writes (its
    `log`). None (the terminal) with --verbose, and for the commands that print only their own lines."""
    if getattr(args, "verbose", True) or args.log is None:
        return None
    return args.log(args)


def run_handled(command: str, action) -> int:
    """Run `action`; input and configuration errors become one line on stderr and exit code 2. Any
    other failure prints its whole traceback to the terminal (even while output is captured), and
    exit code 1."""
    from gitseg.data.uwmgi import DataFormatError

    try:
        code = action()
    except (DataFormatError, FileNotFoundError, FileExistsError, ValueError, FloatingPointError) as exc:
        error(f"gitseg {command}: error: {exc}")
        return 2
    except Exception as exc:
        train = sys.modules.get("gitseg.train")  # loaded by whatever trained; not imported to find out
        if train is not None and isinstance(exc, train.Preempted):
            error(f"gitseg {command}: {exc}")
            return 143  # 128 + SIGTERM, what a scheduler expects of a process it stopped
        error(traceback.format_exc().rstrip())
        error(f"gitseg {command}: failed: {type(exc).__name__}: {exc}")
        return 1
    return code if isinstance(code, int) else 0  # handlers may return an exit code; other values are results


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        log = log_file(args)
    except (FileNotFoundError, ValueError) as exc:  # a search config that cannot be read
        error(f"gitseg {args.command}: error: {exc}")
        return 2
    with captured(log) as capture:
        code = run_handled(args.command, lambda: args.func(args))
        if capture:
            capture.keep = code != 2  # refused input: the one line on the terminal says it all
    if capture and capture.path:
        (say if code == 0 else error)(f"{args.command}: the rest of the output (Ray, Tune, the workers, warnings) "
                                      f"is in {capture.path}; --verbose prints it here")
    return code


def entry() -> None:
    """The console script and `python -m gitseg`: `main` with the garbage collector set for a
    command line rather than a library (tests call `main` and change nothing).

    Importing torch and smp makes over a million objects that live until exit, and a full
    collection walks them all: `predict --dicom` ran 9 of them (1.25 s of its 9 s), and the
    interpreter's last ones at exit took another 1.1 s (BENCHMARKS.md, the first prediction).
    So full collections come a hundred times less often (the younger generations as usual), and
    at the end `gc.freeze` leaves every object to the operating system, which frees the process.
    """
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, 1000)
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
