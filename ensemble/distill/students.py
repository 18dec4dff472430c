"""The Ray side of `gitseg distill`: the student configuration trained on every fold, with the
teacher's targets and on the labels alone, by the refit's own Ray Train runs (search/refit.py).

The one place where `ensemble` imports `search` (docs/ARCHITECTURE.md): a student's fold runs are
refit runs with another configuration, and written twice they would drift apart.

Both students leave out-of-fold probabilities, so each gets post-processing tuned on its own; the
labels-only one is the reference that says what the teacher adds. Everything lives under the
distill work folder: `student/` and `reference/` (the Tune experiments), `student_runs/` and
`reference_runs/` (their Train runs) and refit.json (rank 0: the distilled student, rank 1: labels
only). Re-running resumes each; a run with `--no-reference` trains only the first.
"""

from __future__ import annotations

from pathlib import Path

from gitseg.config import from_dict
from gitseg.progress import say
from gitseg.records import REFIT_RECORD, RefitRecord, SearchRecord, to_json
from search.cluster import init_ray
from search.refit import train_fold_jobs
from search.settings import SearchConfig
from search.storage import write_text

STUDENT, LABELS_ONLY = "student", "labels-only"


def train_students(search: SearchRecord, student: dict, teacher: str, folds: list[int], work, reference: bool = True,
                   log=say) -> RefitRecord:
    """Train `student` (an experiment config dict) on `folds` with `data.teacher` = `teacher` and, with
    `reference`, once more without; writes and returns `<work>/refit.json`. Ray settings (workers,
    logical CPUs, failures) and the OOF's TTA are the ensemble's search's."""
    settings = from_dict(SearchConfig, search.settings)
    tta = settings.refit.tta
    work = str(Path(work).resolve())

    def jobs(rank: int, name: str, path: str | None) -> list[dict]:
        return [{"rank": rank, "trial_id": name, "values": {"data.teacher": path}, "fold": f, "start_from": None}
                for f in folds]

    log(f"distill: the student on folds {folds}, with the teacher" + (" and on the labels alone" if reference else "")
        + f": {len(folds) * (2 if reference else 1)} Train runs")
    connected = init_ray(settings)
    try:
        models = train_fold_jobs(settings, jobs(0, STUDENT, teacher), student, work, "student", "student_runs", tta,
                                 "distill: student")
        if reference:
            models += train_fold_jobs(settings, jobs(1, LABELS_ONLY, None), student, work, "reference",
                                      "reference_runs", tta, "distill: reference")
    finally:
        if connected:
            import ray  # heavy

            ray.shutdown()
    record = RefitRecord(folds=folds, tta=tta, models=models)
    write_text(f"{work}/{REFIT_RECORD}", to_json(record))
    failed = [m for m in models if m.error]
    if failed:
        raise RuntimeError(f"distill: {len(failed)} of {len(models)} student runs failed, e.g. {failed[0].trial_id} "
                           f"fold {failed[0].fold}: {failed[0].error}; fix the cause and run the same command again "
                           f"(finished runs are kept)")
    return record
