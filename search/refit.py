"""The refit: the top-k search configurations trained on every fold, in parallel Ray Train runs,
each leaving its best checkpoint and the out-of-fold probabilities of its fold (refit.json)."""

from __future__ import annotations

import math

from gitseg.checkpoint import BEST
from gitseg.data.cache import Cache
from gitseg.oof import OOF_FOLDER
from gitseg.progress import say
from gitseg.records import REFIT_RECORD, RefitModel, RefitRecord, TrialRow, to_json
from search.cluster import concurrent_trials, trainable
from search.leaderboard import error_line
from search.progress import tune_progress
from search.settings import SearchConfig
from search.storage import experiment_root, filesystem, write_text
from search.tracking import trial_logger
from search.trial import refit_trial

REFIT_EXPERIMENT = "refit"


def run_refit(settings: SearchConfig, rows: list[TrialRow], base: dict, cache: Cache, log=say,
              tracker=None) -> list[RefitModel]:
    """Refit (or resume refitting) the top `settings.refit.topk` rows on every fold; writes refit.json.
    `tracker` (search/tracking.py): each refit run logged as a child of the search's MLflow run."""
    ok = [r for r in rows if r.status != "failed" and not math.isnan(r.best_score)]
    if settings.refit.select == "pareto":  # the score-latency front, best score first (rows are sorted)
        ok = [r for r in ok if r.pareto]
    top = ok[: settings.refit.topk]
    if not top:
        log("search: no successful trial to refit")
        return []
    folds = settings.refit.folds if settings.refit.folds is not None else list(range(cache.manifest["folds"]))
    # The search trained each configuration on the search fold already: that fold's refit run
    # continues the trial's run (to the last epoch if ASHA stopped it) instead of training again.
    jobs = [{"rank": i, "trial_id": r.trial_id, "values": r.values, "fold": f,
             "start_from": r.checkpoint.removesuffix(f"/{BEST}") if f == settings.fold and r.checkpoint else None}
            for i, r in enumerate(top) for f in folds]
    root = experiment_root(settings.storage_path, settings.name)
    reused = sum(1 for job in jobs if job["start_from"])
    which = "the score-latency front's" if settings.refit.select == "pareto" else "the top"
    log(f"search: refit of {which} {len(top)} configuration(s) on folds {folds}: {len(jobs)} Train runs"
        + (f", {reused} of them continuing the search trial's run on fold {settings.fold}" if reused else ""))
    refits = train_fold_jobs(settings, jobs, base, root, REFIT_EXPERIMENT, "refit_runs", settings.refit.tta, "refit",
                             callbacks=[trial_logger(tracker, "refit")] if tracker is not None else [])
    write_text(f"{root}/{REFIT_RECORD}", to_json(RefitRecord(folds=folds, tta=settings.refit.tta, models=refits)))
    failed = [e for e in refits if e.error]
    log(f"search: refit wrote {len(refits) - len(failed)} fold models with out-of-fold probabilities to "
        f"{root}/{REFIT_RECORD}" + (f"; {len(failed)} failed" if failed else ""))
    return refits


def train_fold_jobs(settings: SearchConfig, jobs: list[dict], base: dict, root: str, experiment: str, runs: str,
                    tta: str, label: str, callbacks: list | None = None) -> list[RefitModel]:
    """One Ray Train run per job {rank, trial_id, values, fold, start_from} (the configuration `base`
    with the job's values, on the job's fold), each leaving its best checkpoint and the out-of-fold
    probabilities of its fold with TTA `tta`, as one Tune experiment `<root>/<experiment>` (its Train
    runs under `<root>/<runs>`); re-running resumes it. Returns one entry per job, by rank then fold."""
    import ray.tune  # heavy

    fn = trainable(refit_trial, base=base, storage_path=f"{root}/{runs}", workers=settings.workers,
                   max_failures=settings.max_failures, tta=tta)
    fs, fs_root = filesystem(root)
    path = f"{fs_root}/{experiment}"
    if ray.tune.Tuner.can_restore(path, storage_filesystem=fs):
        tuner = ray.tune.Tuner.restore(path, fn, resume_unfinished=True, resume_errored=True, storage_filesystem=fs)
    else:
        tuner = ray.tune.Tuner(
            fn,
            param_space={"job": ray.tune.grid_search(jobs)},
            tune_config=ray.tune.TuneConfig(max_concurrent_trials=concurrent_trials(settings)),
            run_config=ray.tune.RunConfig(name=experiment, storage_path=fs_root, storage_filesystem=fs,
                                          verbose=1, callbacks=[tune_progress(label, len(jobs)), *(callbacks or [])]),
        )
    refits = []
    for result in tuner.fit():
        job = result.config["job"]
        metrics = result.metrics or {}
        done = metrics.get("stage") == "oof"
        entry = RefitModel(rank=job["rank"], trial_id=job["trial_id"], fold=job["fold"], values=job["values"],
                           score=metrics.get("score"), best_epoch=metrics["epoch"] + 1 if done else None,
                           error=None if result.error is None else error_line(result.error))
        if done and metrics.get("checkpoint_path"):
            entry.checkpoint = f"{metrics['checkpoint_path']}/best.pt"
            entry.oof = f"{metrics['checkpoint_path']}/{OOF_FOLDER}"
        refits.append(entry)
    return sorted(refits, key=lambda e: (e.rank, e.fold))
