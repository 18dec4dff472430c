"""`gitseg distill`: the entry point over `distill`.

Part of the CLI layer (docs/ARCHITECTURE.md): the stage is imported when the command runs.
"""

from __future__ import annotations

from ensemble.distill.folders import student_folder, work_folder
from gitseg.arguments import TTA_CHOICES, add_verbose, log_in
from gitseg.progress import say


def distill_command(args) -> None:
    from ensemble.distill.distill import distill, holdout_text

    result = distill(args.ensemble, args.config, args.set, out=args.out, tta=args.tta,
                     pseudo_labels=args.pseudo_labels, reference=not args.no_reference)
    if "models" in result:
        say(holdout_text(result))


def distill_log(args):
    return log_in(work_folder(student_folder(args.ensemble, args.out)), "distill")


def add_commands(sub) -> None:
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
    p.set_defaults(func=distill_command, log=distill_log)
