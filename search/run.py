"""The search job: check the space, run Tune (Optuna TPE + ASHA) over Ray Train trials, write the
leaderboard, then refit the top-k configurations on every fold. Re-running the same command
resumes: finished trials are kept, unfinished ones continue from their last checkpoint.

Everything lives under `<storage_path>/<name>/`:

    tune/          the Tune experiment of the search (trial results, searcher and Optuna state)
    train_runs/    the Ray Train run of each trial (checkpoints: last.pt, best.pt, metrics)
    leaderboard.csv
    search.json    settings, base config and leaderboard (gitseg.records.SearchRecord)
    refit/         the Tune experiment of the refit; refit_runs/ its Train runs
    refit.json     per (configuration, fold): checkpoint and out-of-fold probabilities
"""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path

from gitseg.config import Config, ConfigError, load_config, to_dict
from gitseg.config_checks import check_config
from gitseg.data.cache import Cache
from gitseg.files import folder_lock
from gitseg.progress import say
from gitseg.records import SEARCH_RECORD, SearchRecord, TrialRow, to_json
from search.budget import bracket_milestones, budget_objects
from search.cluster import concurrent_trials, init_ray, trainable
from search.leaderboard import anytime, format_leaderboard, leaderboard, leaderboard_csv, rung_correlations
from search.progress import tune_progress
from search.refit import run_refit
from search.settings import SearchConfig
from search.space import DefineByRun, base_values, check_space, encode, max_epochs, parse_space
from search.storage import experiment_root, filesystem, write_text
from search.tracking import forget_study, optuna_storage, start_tracker, trial_logger
from search.trial import LATENCY_METRIC, search_trial

SEARCH_EXPERIMENT = "tune"
LATENCY = "latency"  # the objective's name in a search config


def prepare_base(settings: SearchConfig) -> Config:
    cfg = load_config(settings.base, settings.set)
    cfg.data.cache = str(Path(cfg.data.cache).resolve()) if "://" not in cfg.data.cache else cfg.data.cache
    cfg.data.fold = settings.fold
    return cfg


def check_search(settings: SearchConfig, log=say):
    """Everything checkable before a cluster job starts: configs, space, every model in it."""
    base_cfg = prepare_base(settings)
    cache = Cache(base_cfg.data.cache)
    check_config(base_cfg, cache)
    base = to_dict(base_cfg)
    params = parse_space(settings.space)
    checked = check_space(params, base, cache.size)
    check_asha(settings, max_epochs(params, base))
    points = [encode(params, base_values(params, base))]
    for i, point in enumerate(settings.points):
        unknown = [k for k in point if k not in {p.key for p in params}]
        if unknown:
            raise ConfigError(f"points[{i}]: {unknown} are not searched keys")
        points.append(encode(params, {**base_values(params, base), **point}))
    log(f"search: space of {len(params)} parameters is valid ({checked} model variants built and run once); "
        f"{len(points)} configuration(s) evaluated first, the first being the base configuration")
    return base, params, points, cache


def run_search(settings: SearchConfig, log=say, callbacks: list | None = None) -> list[TrialRow]:
    """Run (or resume) the search and its refit; returns the leaderboard rows. `callbacks`: more Tune
    callbacks for the search (a resumed search keeps those it started with: Tune stores them)."""
    base, params, points, cache = check_search(settings, log)
    root = experiment_root(settings.storage_path, settings.name)
    # A second driver of the same search refuses, naming the first; on an object store there is no
    # lock to take (README, "Concurrent commands").
    lock = folder_lock(root, "gitseg search") if "://" not in root else contextlib.nullcontext()
    with lock:
        progress = tune_progress("search", settings.num_samples, settings.metric)
        connected = init_ray(settings)
        try:
            return _search_and_refit(settings, base, params, points, cache, log, [progress, *(callbacks or [])])
        finally:
            if connected:  # and not later: the workers' last lines then reach a captured log, not the terminal
                import ray  # heavy

                ray.shutdown()


def max_brackets(epochs: int, grace_period: int, reduction_factor: int) -> int:
    """The number of ASHA brackets whose last one never stops a trial early: the first bracket with
    no milestone before the last epoch; more brackets would only repeat it."""
    return next(s for s in itertools.count()
                if not [m for m in bracket_milestones(epochs, grace_period, reduction_factor, s) if m < epochs]) + 1


def check_asha(settings: SearchConfig, epochs: int) -> None:
    asha = settings.asha
    if not asha.enabled:
        return
    if not 1 <= asha.grace_period <= epochs:
        raise ConfigError(f"asha.grace_period must be between 1 and the epochs, {epochs} (got {asha.grace_period})")
    if asha.reduction_factor < 2:
        raise ConfigError(f"asha.reduction_factor must be at least 2 (got {asha.reduction_factor})")
    most = max_brackets(epochs, asha.grace_period, asha.reduction_factor)
    if not 1 <= asha.brackets <= most:
        raise ConfigError(f"asha.brackets must be between 1 and {most} for {epochs} epochs, grace_period "
                          f"{asha.grace_period} and reduction_factor {asha.reduction_factor} (got {asha.brackets}); "
                          f"at {most} the last bracket never stops a trial early")


def compute(settings: SearchConfig, rows: list[TrialRow]) -> dict:
    """What the search spent (the epochs every trial trained, a restarted trial's earlier ones
    included) and its budget."""
    return {"trial_epochs": sum(len(r.history) for r in rows), "budget_trial_epochs": settings.budget.trial_epochs,
            "budget_wall_s": settings.budget.wall_s}


def make_scheduler(settings: SearchConfig, epochs: int):
    """ASHA (one bracket or several) on the epochs trained, or FIFO (every trial runs to the end)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler  # heavy: Ray's Tune

    if not settings.asha.enabled:
        return FIFOScheduler()
    return ASHAScheduler(time_attr="epochs_done", max_t=epochs, grace_period=settings.asha.grace_period,
                         reduction_factor=settings.asha.reduction_factor, brackets=settings.asha.brackets)


def make_searcher(settings: SearchConfig, params, points: list[dict], storage=None):
    """Optuna's TPE through Ray Tune: single-objective (the score), or with `objectives: [score,
    latency]` multi-objective, told each finished trial's last score and its latency. ASHA, the
    scheduler, ranks trials by the score alone either way. `storage`: an Optuna RDB storage holding
    the study under the search's name (None: in memory)."""
    from ray.tune.search.optuna import OptunaSearch  # heavy: Ray's Optuna bridge

    study = {"storage": storage, "study_name": settings.name} if storage is not None else {}
    if LATENCY in settings.objectives:
        return OptunaSearch(space=DefineByRun(params), metric=[settings.metric, LATENCY_METRIC], mode=["max", "min"],
                            points_to_evaluate=points, seed=settings.seed, **study)
    return OptunaSearch(space=DefineByRun(params), metric=settings.metric, mode="max", points_to_evaluate=points,
                        seed=settings.seed, **study)


def _search_and_refit(settings: SearchConfig, base: dict, params, points, cache: Cache, log,
                      callbacks: list) -> list[TrialRow]:
    import ray.tune  # heavy: Ray's Tune and the Optuna bridge

    root = experiment_root(settings.storage_path, settings.name)
    latency_tta = settings.refit.tta if LATENCY in settings.objectives else None
    fn = trainable(search_trial, params=params, base=base, storage_path=f"{root}/train_runs",
                   workers=settings.workers, max_failures=settings.max_failures, latency_tta=latency_tta)
    fs, fs_root = filesystem(root)
    experiment = f"{fs_root}/{SEARCH_EXPERIMENT}"
    resume = ray.tune.Tuner.can_restore(experiment, storage_filesystem=fs)
    tracker = start_tracker(settings, root, resume, log)
    storage, url = optuna_storage(settings, root)
    if url:
        log(f"search: Optuna study {settings.name!r} in {url} (follow it with `optuna-dashboard {url}`)")
    elif settings.tracking.optuna_storage == "sqlite":
        log("search: the Optuna study stays in this driver's memory (no local folder for SQLite on an object "
            "store; set tracking.optuna_storage to a database URL to keep it)")
    if resume:
        # Tune restores the searcher (its study in the same database) and the callbacks it started with.
        log(f"search: resuming {root}/{SEARCH_EXPERIMENT} (finished trials are kept, unfinished ones continue)")
        tuner = ray.tune.Tuner.restore(experiment, fn, resume_unfinished=True, resume_errored=False,
                                       restart_errored=False, storage_filesystem=fs)
    else:
        if storage is not None:
            forget_study(storage, settings.name)
        if tracker is not None:
            callbacks = [*callbacks, trial_logger(tracker, "trial", params)]
        epochs = max_epochs(params, base)
        scheduler = make_scheduler(settings, epochs)
        searcher, stopper = budget_objects(settings, epochs, make_searcher(settings, params, points, storage))
        tuner = ray.tune.Tuner(
            fn,
            tune_config=ray.tune.TuneConfig(metric=settings.metric, mode="max", search_alg=searcher,
                                            scheduler=scheduler, num_samples=settings.num_samples,
                                            max_concurrent_trials=concurrent_trials(settings)),
            run_config=ray.tune.RunConfig(name=SEARCH_EXPERIMENT, storage_path=fs_root, storage_filesystem=fs,
                                          verbose=1, failure_config=ray.tune.FailureConfig(max_failures=0),
                                          callbacks=callbacks, stop=stopper),
        )
    results = tuner.fit()
    rows = leaderboard(results, params, base, fs)
    write_text(f"{root}/leaderboard.csv", leaderboard_csv(rows))
    write_text(f"{root}/{SEARCH_RECORD}", to_json(SearchRecord(settings=to_dict(settings), base=base,
                                                               cache=cache.manifest["source"], leaderboard=rows,
                                                               rung_spearman=rung_correlations(rows),
                                                               anytime=anytime(rows), compute=compute(settings, rows))))
    log(format_leaderboard(rows))
    spent = compute(settings, rows)
    limit = f" of a budget of {spent['budget_trial_epochs']}" if spent["budget_trial_epochs"] else ""
    log(f"search: leaderboard in {root}/leaderboard.csv; {spent['trial_epochs']} trial-epochs spent{limit}")
    if tracker is not None:
        tracker.finish_search(root, rows)
    if settings.refit.topk > 0:
        run_refit(settings, rows, base, cache, log, tracker)
    if tracker is not None:
        tracker.end()
    return rows
