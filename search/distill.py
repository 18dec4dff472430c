"""The Ray side of `gitseg distill`: the student configuration trained on every fold, with the
teacher's targets and on the labels alone, as the refit trains its configurations (refit.py).

Both students leave out-of-fold probabilities, so each gets post-processing tuned on its own; the
labels-only one is the reference that says what the teacher adds. Everything lives under the
distill work folder: `students/` (the Tune experiment), `student_runs/` (the Train runs) and
refit.json (rank 0: the distilled student, rank 1: labels only). Re-running resumes.
"""

from __future__ import annotations

from pathlib import Path

from gitseg.progress import say
from gitseg.records import REFIT_RECORD, RefitRecord, to_json
from search.cluster import init_ray
from search.refit import train_fold_jobs
from search.settings import SearchConfig
from search.storage import write_text

STUDENT, LABELS_ONLY = "student", "labels-only"


def train_students(settings: SearchConfig, student: dict, teacher: str, folds: list[int], work, tta: str,
                   log=say) -> RefitRecord:
    """Train `student` (an experiment config dict) on `folds`, once with `data.teacher` = `teacher` and
    once without; writes and returns `<work>/refit.json`. Ray settings come from `settings` (the
    ensemble's search: workers, logical CPUs, failures)."""
    work = str(Path(work).resolve())
    jobs = [{"rank": rank, "trial_id": name, "values": {"data.teacher": path}, "fold": f, "start_from": None}
            for rank, (name, path) in enumerate(((STUDENT, teacher), (LABELS_ONLY, None))) for f in folds]
    log(f"distill: the student on folds {folds}, with the teacher and on the labels alone: {len(jobs)} Train runs")
    connected = init_ray(settings)
    try:
        models = train_fold_jobs(settings, jobs, student, work, "students", "student_runs", tta, "distill")
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
