"""The `gitseg` command line: thin handlers over library functions.

Each handler imports its stage (and with it torch or Ray) when it runs: `gitseg --help` and the
data commands start fast, and the core never imports `search` or `ensemble` at module level.
"""

from __future__ import annotations

import argparse
import gc
import sys
import traceback
from pathlib import Path

from gitseg import __version__
from gitseg.progress import captured, counter, error, say

# gitseg.infer.TTA_SETS' names, written out so that `--help` does not import torch (a test keeps them equal).
TTA_CHOICES = ("none", "hflip", "flips")


def cmd_synth(args) -> None:
    from gitseg.data.synth import UWMGI_TEST_CASES, write_dataset

    shape = {"cases": args.cases, "days": args.days, "slices": args.slices, "size": args.size}
    # What each profile lets the options set, and its defaults (the real scans set the rest).
    allowed, defaults = {"small": (set(shape), {"cases": 8, "days": 3}), "uwmgi": (set(), {}),
                         "shapes": ({"cases"}, {"cases": 1})}[args.profile]
    given = [f"--{k}" for k, v in shape.items() if v is not None and k not in allowed]
    if given:
        raise ValueError(f"--profile {args.profile} takes the real scans' shapes; leave out {', '.join(given)}")
    shape.update({k: v for k, v in defaults.items() if shape[k] is None})
    test_cases = args.test_cases if args.test_cases is not None else (
        UWMGI_TEST_CASES if args.profile == "uwmgi" else 1)
    summary = write_dataset(args.out, **shape, seed=args.seed, test_cases=test_cases, workers=args.workers,
                            overwrite=args.overwrite, progress=counter("synth: case-days"), profile=args.profile)
    say(f"synth: wrote {summary['train_case_days']} labelled and {summary['test_case_days']} unlabelled "
          f"case-days ({summary['train_slices']} labelled slices; sizes {', '.join(summary['sizes'])}) to {args.out}")
    if args.dicom:
        from gitseg.data.dicom import write_dicom_tree

        folders = write_dicom_tree(args.out, "test", seed=args.seed, progress=counter("synth: DICOM series"))
        say(f"synth: wrote the {len(folders)} unlabelled case-days as DICOM MR series to {Path(args.out) / 'dicom'}")


def cmd_prepare(args) -> None:
    from gitseg.data.cache import prepare, split_summary
    from gitseg.tables import format_table

    manifest = prepare(args.data, args.out, size=args.size, folds=args.folds, holdout=args.holdout,
                       seed=args.seed, skip_bad=args.skip_bad, workers=args.workers,
                       progress=counter("prepare: case-days"))
    say(format_table(split_summary(manifest)))
    say(f"prepare: cache ready in {args.out}")


def cmd_summary(args) -> None:
    from gitseg.data.cache import Cache, split_summary
    from gitseg.tables import format_table

    cache = Cache(args.cache)
    print(f"cache {args.cache}: {cache.size} px, {cache.manifest['folds']} folds, source {cache.manifest['source']}")
    print(format_table(split_summary(cache.manifest)))
    if cache.manifest.get("skipped"):
        print(f"skipped case-days: {', '.join(cache.manifest['skipped'])}")


def cmd_train(args) -> None:
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


def cmd_search(args) -> None:
    from search.run import run_search
    from search.settings import load_search_config

    run_search(load_search_config(args.config, args.set))


def cmd_ensemble(args) -> None:
    from ensemble.build import build_ensemble
    from ensemble.evaluate import FEW_CASES
    from gitseg.tables import format_table

    manifest = build_ensemble(args.run, topk=args.topk, out=args.out, tta=args.tta, method=args.method,
                              cache_dir=args.cache, latency_budget=args.latency_budget)
    holdout = manifest.scores.holdout
    if holdout:
        say(format_table([{k: r.get(k, "") for k in ("variant", "members", "tta", "score", "dice", "hausdorff", "gain",
                                                      "gain_over")} for r in holdout.ablation], floats="{:.4f}"))
        say(format_table(holdout.per_class, floats="{:.4f}"))
        say(f"ensemble: holdout score {holdout.score:.4f} on {len(holdout.case_days)} case-days "
            f"(kaggle convention)")
        gain = holdout.ensemble_gain
        if gain:
            say(f"ensemble: what the ensemble adds over the {gain['over']}: {gain['gain']:+.4f}, 95% interval "
                f"[{gain['ci95'][0]:+.4f}, {gain['ci95'][1]:+.4f}] (paired bootstrap over {gain['cases']} holdout "
                f"cases" + (": too few to mean much" if gain["cases"] < FEW_CASES else "") + ")")


def distill_out(args) -> Path:
    """The student's folder: --out, or `<ensemble>-student` beside the ensemble."""
    ensemble = Path(args.ensemble)
    return Path(args.out) if args.out else ensemble.parent / f"{ensemble.name}-student"


def cmd_distill(args) -> None:
    from ensemble.distill import build_student, plan, write_teacher
    from gitseg.config import from_dict, to_dict
    from gitseg.records import SEARCH_RECORD, SearchRecord, load
    from gitseg.tables import format_table
    from search.distill import train_students
    from search.settings import SearchConfig

    p = plan(args.ensemble, args.config, args.set, out=distill_out(args), tta=args.tta)
    search = load(SearchRecord, p.run_dir / SEARCH_RECORD, "the ensemble's search folder has moved")
    settings = from_dict(SearchConfig, search.settings)  # Ray resources and workers as the search had them
    pseudo = None if args.pseudo_labels is None else (args.pseudo_labels or p.cache.manifest["source"])
    source = write_teacher(p, pseudo)
    folds = sorted({p.cache.entries[cd]["fold"] for cd in p.cache.case_days()})
    record = train_students(settings, to_dict(p.student), str(p.teacher.resolve()), folds, p.work,
                            tta=search.settings["refit"]["tta"], reference=not args.no_reference)
    result = build_student(p, record, source)
    if "models" in result:
        say(format_table([{k: r[k] for k in ("model", "tta", "ms_per_slice", "latency_vs_ensemble", "score", "dice",
                                             "hausdorff", "gain_over_single")} for r in result["models"]],
                         floats="{:.4f}"))


def cmd_predict(args) -> int:
    sources = [name for name in ("data", "dicom", "nifti_in") if getattr(args, name)]
    if len(sources) != 1:
        raise ValueError("give exactly one of --data (a UWMGI tree), --dicom (one series folder) or --nifti-in "
                         "(one NIfTI volume)")
    if args.dicom or args.nifti_in:
        from ensemble.clinical import predict_series

        if args.ray or args.nifti or args.split != "test":
            raise ValueError("--ray, --nifti and --split apply to a UWMGI tree (--data); one series is predicted "
                             "in this process and its NIfTI labels are written to --out")

        predict_series(args.ensemble, args.out, dicom=args.dicom, nifti_in=args.nifti_in, device=args.device,
                       force=args.force)
        return 0
    from ensemble.predict import predict_tree

    result = predict_tree(args.ensemble, args.data, args.out, nifti=args.nifti, split=args.split,
                          device=args.device, ray_address=args.ray, force=args.force)
    if result["failed"]:
        error(f"gitseg predict: {len(result['failed'])} case-day(s) failed (listed above); the others are in "
              f"{result['submission']}")
        return 1
    return 0


def cmd_robustness(args) -> None:
    from ensemble.robustness import CORRUPTIONS, run_robustness
    from gitseg.tables import format_table

    result = run_robustness(args.ensemble, cache_dir=args.cache, out=args.out,
                            corruptions=args.corruptions or CORRUPTIONS, severities=args.severities or (1, 2, 3),
                            data_root=args.data, seed=args.seed)
    say(format_table([{k: r.get(k, "") for k in ("corruption", "severity", "amount", "score", "drop", "drop_ci95_low",
                                                  "drop_ci95_high", "worst_class")}
                      for r in result["table"]], floats="{:.4f}"))


def cmd_report(args) -> None:
    from ensemble.report import build_report

    build_report(args.run, ensemble_dir=args.ensemble, out=args.out)


def cmd_demo(args) -> None:
    from gitseg.demo import run_demo

    run_demo(out=args.out, config=args.config, trials=args.trials, epochs=args.epochs)


def log_file(args) -> Path | None:
    """Where a command's Ray, Tune and worker output goes: a file in its run folder. None (the
    terminal) with --verbose, and for the commands that print only their own lines."""
    if getattr(args, "verbose", True):
        return None
    if args.command == "search":
        from search.settings import load_search_config

        settings = load_search_config(args.config, args.set)
        if "://" in settings.storage_path:  # an object store: the log stays on this machine
            return Path(f"{settings.name}-search.log").resolve()
        return Path(settings.storage_path, settings.name, "search.log").resolve()
    if args.command == "distill":
        out = distill_out(args)
        return out.with_name(f"{out.name}.work") / "distill.log"
    # Each log goes into the folder the command writes, never into one it only reads.
    folder = {"robustness": lambda: args.out or Path(args.ensemble, "robustness"),
              "ensemble": lambda: args.out or Path(args.run, "ensemble"),
              "report": lambda: args.out or Path(args.run, "report"),
              "predict": lambda: args.out, "demo": lambda: args.out}[args.command]()
    return Path(folder, f"{args.command}.log").resolve()


def add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="print Ray's, Tune's and the workers' output here instead of to the run's log file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gitseg", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"gitseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic data set in the UWMGI format")
    p.add_argument("--out", required=True, help="folder to write (train.csv, train/, test/)")
    p.add_argument("--profile", default="small", choices=("small", "uwmgi", "shapes"),
                   help="small: the options below (the default); uwmgi: the real training set's shape (85 cases, "
                        "274 case-days, 38,496 slices at the real sizes) and 50 unlabelled test cases; shapes: "
                        "--cases one-day cases of each real scan geometry")
    p.add_argument("--cases", type=int, default=None, help="labelled cases (default 8)")
    p.add_argument("--days", type=int, default=None, help="scan days per case (default 3)")
    p.add_argument("--slices", type=int, default=None, help="slices per scan (default: 144, or 80 for 276 px scans)")
    p.add_argument("--size", type=int, default=None, help="longer image side in px (default: the real sizes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-cases", type=int, default=None, help="unlabelled cases under test/ (default 1; 50 with "
                                                                 "--profile uwmgi)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    p.add_argument("--overwrite", action="store_true", help="replace a data set already in --out")
    p.add_argument("--dicom", action="store_true",
                   help="also write the unlabelled case-days as DICOM MR series under OUT/dicom/<case_day>/")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("prepare", help="build the volume cache, folds and holdout from a UWMGI root")
    p.add_argument("--data", required=True, help="UWMGI root: the folder holding train.csv and train/")
    p.add_argument("--out", required=True, help="cache folder")
    p.add_argument("--size", type=int, default=256, help="square network input size in px (default 256)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--holdout", type=float, default=0.15, help="fraction of cases held out (default 0.15)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-bad", action="store_true", help="leave out case-days with bad files instead of stopping")
    p.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("summary", help="print the splits and class frequencies of a cache")
    p.add_argument("--cache", required=True)
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("train", help="train one fold (the unit of work of every search trial)")
    p.add_argument("--config", default=None, help="experiment YAML (default: built-in defaults)")
    p.add_argument("--fold", type=int, default=None, help="validation fold (overrides data.fold)")
    p.add_argument("--out", default=None, help="run folder (overrides out)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.lr=3e-4")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("search", help="distributed search (Ray Tune + Optuna + ASHA), then refit over folds")
    p.add_argument("--config", required=True, help="search config YAML (see configs/search_demo.yaml)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a search setting")
    add_verbose(p)
    p.set_defaults(func=cmd_search)

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
    p.set_defaults(func=cmd_ensemble)

    p = sub.add_parser("distill", help="train one student network on the labels and an ensemble's probabilities; "
                                       "its folder works with `gitseg predict`")
    p.add_argument("--ensemble", required=True, help="teacher ensemble folder made by `gitseg ensemble`")
    p.add_argument("--config", required=True, help="the student's experiment YAML (e.g. configs/student_demo.yaml); "
                                                   "data.cache is the ensemble's")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a student config key")
    p.add_argument("--out", default=None, help="the student's ensemble folder (default: ENSEMBLE-student beside "
                                               "the ensemble; its work files go to OUT.work)")
    p.add_argument("--tta", default="none", choices=TTA_CHOICES,
                   help="the student's test-time augmentation at prediction time (default none)")
    p.add_argument("--pseudo-labels", nargs="?", const="", default=None, metavar="ROOT",
                   help="also train on the unlabelled test/ case-days of ROOT (default: the cache's data root), "
                        "labelled by the ensemble")
    p.add_argument("--no-reference", action="store_true",
                   help="do not train the student on the labels alone (the holdout table's reference row that says "
                        "what the teacher adds): half the training")
    add_verbose(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("predict", help="predict a UWMGI tree (submission.csv, NIfTI masks), or one DICOM series "
                                       "(DICOM-SEG, RT Structure Set, NIfTI) or NIfTI volume")
    p.add_argument("--ensemble", required=True, help="ensemble folder made by `gitseg ensemble` or `gitseg distill`")
    p.add_argument("--data", default=None, help="UWMGI root holding test/ (or train/ with --split train)")
    p.add_argument("--dicom", default=None, metavar="SERIES_DIR",
                   help="a folder holding one MR series (files in any order, any names): writes seg.dcm, "
                        "rtstruct.dcm and labels.nii.gz to --out")
    p.add_argument("--nifti-in", default=None, metavar="FILE", help="one NIfTI volume: writes labels.nii.gz to --out")
    p.add_argument("--out", required=True, help="folder for the outputs")
    p.add_argument("--nifti", default=None, help="folder for one NIfTI label volume (+ scan) per case-day")
    p.add_argument("--split", default="test", choices=("test", "train"), help="which tree to read (default test)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="spread volumes over a Ray cluster: auto (the running cluster), an address, or local")
    p.add_argument("--force", action="store_true",
                   help="predict a scan unlike the ensemble's training scans (too few slices, not axial, field of "
                        "view or spacing far off) instead of refusing it; the warnings are recorded in the outputs")
    add_verbose(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("robustness", help="score an ensemble's holdout under MRI corruptions (bias field, noise, "
                                          "motion, ghosting, spike, blur, lower resolution, gamma), 3 severities each")
    p.add_argument("--ensemble", required=True, help="ensemble folder made by `gitseg ensemble` or `gitseg distill`")
    p.add_argument("--cache", default=None, help="prepared cache whose holdout is scored (default: the ensemble's)")
    p.add_argument("--data", default=None, help="UWMGI root of the raw scans (default: the one the cache was "
                                                "prepared from)")
    p.add_argument("--out", default=None, help="output folder (default ENSEMBLE/robustness; `gitseg report` shows it)")
    p.add_argument("--corruptions", nargs="+", default=None, metavar="NAME", help="a subset (default: all)")
    p.add_argument("--severities", nargs="+", type=int, default=None, help="a subset of 1 2 3 (default: all)")
    p.add_argument("--seed", type=int, default=0)
    add_verbose(p)
    p.set_defaults(func=cmd_robustness)

    p = sub.add_parser("report", help="static HTML/Markdown/CSV report of a search and its ensemble")
    p.add_argument("--run", required=True, help="search folder: <storage_path>/<name>")
    p.add_argument("--ensemble", default=None, help="ensemble folder (default RUN/ensemble when present)")
    p.add_argument("--out", default=None, help="report folder (default RUN/report)")
    add_verbose(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="the whole pipeline on synthetic data: synth, prepare, search, refit, "
                                    "ensemble, report")
    p.add_argument("--out", default="runs/demo", help="folder for everything (default runs/demo)")
    p.add_argument("--config", default="configs/search_demo.yaml", help="search config (default %(default)s)")
    p.add_argument("--trials", type=int, default=None, help="search trials (default: configs/search_demo.yaml)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per trial (default: configs/demo.yaml)")
    add_verbose(p)
    p.set_defaults(func=cmd_demo)
    return parser


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
