"""`gitseg synth`, `gitseg prepare` and `gitseg summary`: the entry points over the data stage.

Part of the CLI layer (docs/ARCHITECTURE.md): what a command needs is imported when it runs.
"""

from __future__ import annotations

from pathlib import Path

from gitseg.progress import counter, say

# What each synth profile lets the shape options set, and its defaults (the real scans set the rest).
PROFILES = {"small": ({"cases", "days", "slices", "size"}, {"cases": 8, "days": 3}), "uwmgi": (set(), {}),
            "shapes": ({"cases"}, {"cases": 1})}


def synth_command(args) -> None:
    from gitseg.data.synth import UWMGI_TEST_CASES, write_dataset

    shape = {"cases": args.cases, "days": args.days, "slices": args.slices, "size": args.size}
    allowed, defaults = PROFILES[args.profile]
    given = [f"--{k}" for k, v in shape.items() if v is not None and k not in allowed]
    if given:
        raise ValueError(f"--profile {args.profile} takes the real scans' shapes; leave out {', '.join(given)}")
    shape.update({k: v for k, v in defaults.items() if shape[k] is None})
    test_cases = args.test_cases if args.test_cases is not None else (
        UWMGI_TEST_CASES if args.profile == "uwmgi" else 1)
    summary = write_dataset(args.out, **shape, seed=args.seed, test_cases=test_cases, workers=args.workers,
                            overwrite=args.overwrite, progress=counter("synth: case-days"), profile=args.profile,
                            anatomy=args.anatomy)
    say(f"synth: wrote {summary['train_case_days']} labelled and {summary['test_case_days']} unlabelled "
        f"case-days ({summary['train_slices']} labelled slices; sizes {', '.join(summary['sizes'])}) to {args.out}")
    if args.dicom:
        from gitseg.data.dicom import write_dicom_tree

        folders = write_dicom_tree(args.out, "test", seed=args.seed, progress=counter("synth: DICOM series"))
        say(f"synth: wrote the {len(folders)} unlabelled case-days as DICOM MR series to {Path(args.out) / 'dicom'}")


def prepare_command(args) -> None:
    from gitseg.data.cache import prepare, split_summary
    from gitseg.tables import format_table

    manifest = prepare(args.data, args.out, size=args.size, folds=args.folds, holdout=args.holdout,
                       seed=args.seed, skip_bad=args.skip_bad, workers=args.workers,
                       progress=counter("prepare: case-days"), fmt=args.format, labels=args.labels,
                       case_pattern=args.case_pattern, rois=args.rois)
    say(format_table(split_summary(manifest)))
    say(f"prepare: cache ready in {args.out}")


def export_command(args) -> None:
    if (args.onnx is None) == (args.to is None):
        raise ValueError("give one of --to nnunet --cache CACHE (a data set for nnU-Net) or --onnx ENSEMBLE_DIR "
                         "(an ensemble for ONNX Runtime)")
    if args.onnx is not None:
        from ensemble.deploy.export import export_onnx

        export_onnx(args.onnx, args.out, log=say)
        return
    if args.cache is None:
        raise ValueError("--to nnunet needs --cache (a cache folder of `gitseg prepare`)")
    from gitseg.data.export import export_nnunet

    export_nnunet(args.cache, args.out, overlap=args.overlap, name=args.name, overwrite=args.overwrite,
                  progress=counter("export: case-days"), log=say)


def summary_command(args) -> None:
    from gitseg.data.cache import Cache, split_summary
    from gitseg.tables import format_table

    cache = Cache(args.cache)
    print(f"cache {args.cache}: {cache.size} px, {cache.manifest['folds']} folds, source {cache.manifest['source']}")
    print(format_table(split_summary(cache.manifest)))
    if cache.manifest.get("skipped"):
        print(f"skipped case-days: {', '.join(cache.manifest['skipped'])}")


def add_commands(sub) -> None:
    p = sub.add_parser("synth", help="write a synthetic data set in the UWMGI format")
    p.add_argument("--out", required=True, help="folder to write (train.csv, train/, test/)")
    p.add_argument("--profile", default="small", choices=tuple(PROFILES),
                   help="small: the options below (the default); uwmgi: the real training set's shape (85 cases, "
                        "274 case-days, 38,496 slices at the real sizes) and 50 unlabelled test cases; shapes: "
                        "--cases one-day cases of each real scan geometry")
    p.add_argument("--anatomy", default="realistic", choices=("schematic", "realistic"),
                   help="realistic (the default): bowel loops, organ walls and contents, MRI contrast that varies "
                        "between patients and days; schematic: the earlier smooth organ shapes (docs/phantom.md)")
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
    p.set_defaults(func=synth_command, log=None)

    p = sub.add_parser("prepare", help="build the volume cache, folds and holdout from a data set (UWMGI, nnU-Net "
                                       "NIfTI, DICOM + RTSTRUCT)")
    p.add_argument("--data", required=True, help="a UWMGI root (train.csv, train/), an nnU-Net raw data set "
                                                 "(dataset.json, imagesTr/, labelsTr/) or a folder of DICOM "
                                                 "patients with RT Structure Sets (docs/your-data.md)")
    p.add_argument("--format", default="auto", choices=("auto", "uwmgi", "nnunet", "dicom"),
                   help="the layout of --data (default: told from its files)")
    p.add_argument("--labels", default=None,
                   help="nnU-Net: which labels are the organs, e.g. large_bowel=1,small_bowel=2,stomach=3+5 (values, "
                        "label names, or none); default: labels named like the organs")
    p.add_argument("--case-pattern", default=None,
                   help="nnU-Net: a regular expression with groups (?P<case>...) and optionally (?P<day>...) on the "
                        "image names, for scan days of one patient (folds keep a patient together); default: "
                        "gitseg's own caseN_dayM names, any other image its own case")
    p.add_argument("--rois", default=None,
                   help="DICOM: which ROIs are the organs, e.g. large_bowel=Colon,stomach=Magen|Stomach (either "
                        "name) or stomach=none; default: the TG-263 names Bowel_Large, Bowel_Small, Stomach "
                        "(case-insensitive)")
    p.add_argument("--out", required=True, help="cache folder")
    p.add_argument("--size", type=int, default=256, help="square network input size in px (default 256)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--holdout", type=float, default=0.15, help="fraction of cases held out (default 0.15)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-bad", action="store_true", help="leave out case-days with bad files instead of stopping")
    p.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    p.set_defaults(func=prepare_command, log=None)

    p = sub.add_parser("export", help="write a cache's case-days as an nnU-Net raw data set with gitseg's folds, or "
                                      "an ensemble's members as ONNX models")
    p.add_argument("--to", default=None, choices=("nnunet",), help="the data set layout to write (with --cache)")
    p.add_argument("--cache", default=None, help="a cache folder of `gitseg prepare`")
    p.add_argument("--onnx", default=None, metavar="ENSEMBLE_DIR",
                   help="an ensemble (or distilled student) folder to export for `gitseg predict --runtime onnx`")
    p.add_argument("--out", required=True, help="the folder to write (e.g. nnUNet_raw/Dataset501_Gitseg)")
    p.add_argument("--overlap", default="regions", choices=("regions", "priority"),
                   help="where organs overlap: regions (the default) keeps every organ's voxels as nnU-Net region "
                        "labels; priority writes one label per voxel and counts what it loses")
    p.add_argument("--name", default="gitseg", help="dataset.json's name")
    p.add_argument("--overwrite", action="store_true", help="replace a data set already in --out")
    p.set_defaults(func=export_command, log=None)

    p = sub.add_parser("summary", help="print the splits and class frequencies of a cache")
    p.add_argument("--cache", required=True)
    p.set_defaults(func=summary_command, log=None)
