"""The search job: validate the space, run Tune (Optuna TPE + ASHA) over Ray Train trials, write the
leaderboard, then refit the top-k configurations on every fold. Re-running the same command
resumes: finished trials are kept, unfinished ones continue from their last checkpoint.

Everything lives under `<storage_path>/<name>/`:

    tune/          the Tune experiment of the search (trial results, searcher and Optuna state)
    train_runs/    the Ray Train run of each trial (checkpoints: last.pt, best.pt, metrics)
    leaderboard.csv
    refit/         the Tune experiment of the refit; refit_runs/ its Train runs
    refit.json     per (configuration, fold): checkpoint and out-of-fold probabilities
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import os
from pathlib import Path

from gitseg.config import Config, ConfigError, load_config, to_dict
from gitseg.progress import say
from gitseg.tables import format_table
from search.settings import SearchConfig
from search.storage import filesystem
from search.space import DefineByRun, base_values, decode, encode, max_epochs, parse_space, validate_space

SEARCH_EXPERIMENT, REFIT_EXPERIMENT = "tune", "refit"


# ---------------------------------------------------------------------------------------------
# Storage: a local folder or a URI (pyarrow filesystems, search/storage.py), the same code for both


def experiment_root(settings: SearchConfig) -> str:
    path = settings.storage_path
    if "://" not in path:
        path = str(Path(path).resolve())
    return f"{path.rstrip('/')}/{settings.name}"


def write_text(uri_or_path: str, text: str) -> None:
    fs, path = filesystem(uri_or_path)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


# ---------------------------------------------------------------------------------------------
# Ray


def init_ray(settings: SearchConfig, log=say) -> None:
    """Join the cluster named by RAY_ADDRESS (ray job submit, ray submit), or start a local instance."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(num_cpus=settings.num_cpus, log_to_driver=True)
    log(f"search: Ray resources {ray.cluster_resources()}")


# The trial driver only waits for its Train run; Ray needs it to reserve something, so a sliver.
TRIAL_DRIVER_CPU = 0.01


def trial_resources(settings: SearchConfig) -> dict:
    """What one trial reserves: its driver and its DDP workers."""
    w = settings.workers
    need = {"CPU": TRIAL_DRIVER_CPU + w.num_workers * w.cpus_per_worker}
    if w.use_gpu:
        need["GPU"] = float(w.num_workers)
    return need


def concurrent_trials(settings: SearchConfig) -> int:
    """max_concurrent_trials from the config, or what the cluster's CPUs/GPUs can hold at once."""
    if settings.max_concurrent_trials:
        return settings.max_concurrent_trials
    import ray

    have = ray.cluster_resources()
    fits = [have.get(k, 0.0) / v for k, v in trial_resources(settings).items() if v > 0]
    return max(1, int(min(fits)))


def _trainable(fn, **kwargs):
    import ray.tune

    return ray.tune.with_resources(functools.partial(fn, **kwargs), {"CPU": TRIAL_DRIVER_CPU})


# ---------------------------------------------------------------------------------------------
# The search


def prepare_base(settings: SearchConfig) -> Config:
    cfg = load_config(settings.base, settings.set)
    cfg.data.cache = str(Path(cfg.data.cache).resolve()) if "://" not in cfg.data.cache else cfg.data.cache
    cfg.data.fold = settings.fold
    return cfg


def validate(settings: SearchConfig, log=say):
    """Everything checkable before a cluster job starts: configs, space, every model in it."""
    from gitseg.data.cache import Cache
    from gitseg.train import validate_config

    base_cfg = prepare_base(settings)
    cache = Cache(base_cfg.data.cache)
    validate_config(base_cfg, cache)
    base = to_dict(base_cfg)
    params = parse_space(settings.space)
    checked = validate_space(params, base, cache.size)
    points = [encode(params, base_values(params, base))]
    for i, point in enumerate(settings.points):
        unknown = [k for k in point if k not in {p.key for p in params}]
        if unknown:
            raise ConfigError(f"points[{i}]: {unknown} are not searched keys")
        points.append(encode(params, {**base_values(params, base), **point}))
    log(f"search: space of {len(params)} parameters is valid ({checked} model variants built and run once); "
        f"{len(points)} configuration(s) evaluated first, the first being the base configuration")
    return base, params, points, cache


def run_search(settings: SearchConfig, log=say) -> list[dict]:
    """Run (or resume) the search and its refit; returns the leaderboard rows."""
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from search.trial import search_trial

    base, params, points, cache = validate(settings, log)
    init_ray(settings, log)
    root = experiment_root(settings)
    trainable = _trainable(search_trial, params=params, base=base, storage_path=f"{root}/train_runs",
                           workers=settings.workers, max_failures=settings.max_failures)
    fs, fs_root = filesystem(root)
    experiment = f"{fs_root}/{SEARCH_EXPERIMENT}"
    if ray.tune.Tuner.can_restore(experiment, storage_filesystem=fs):
        log(f"search: resuming {root}/{SEARCH_EXPERIMENT} (finished trials are kept, unfinished ones continue)")
        tuner = ray.tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=False,
                                       restart_errored=False, storage_filesystem=fs)
    else:
        epochs = max_epochs(params, base)
        if settings.asha.enabled:
            scheduler = ASHAScheduler(time_attr="epochs_done", max_t=epochs, grace_period=settings.asha.grace_period,
                                      reduction_factor=settings.asha.reduction_factor)
        else:
            scheduler = FIFOScheduler()
        searcher = OptunaSearch(space=DefineByRun(params), metric=settings.metric, mode="max",
                                points_to_evaluate=points, seed=settings.seed)
        tuner = ray.tune.Tuner(
            trainable,
            tune_config=ray.tune.TuneConfig(metric=settings.metric, mode="max", search_alg=searcher,
                                            scheduler=scheduler, num_samples=settings.num_samples,
                                            max_concurrent_trials=concurrent_trials(settings)),
            run_config=ray.tune.RunConfig(name=SEARCH_EXPERIMENT, storage_path=fs_root, storage_filesystem=fs,
                                          verbose=1, failure_config=ray.tune.FailureConfig(max_failures=0)),
        )
    results = tuner.fit()
    rows = leaderboard(results, params, base, fs)
    write_text(f"{root}/leaderboard.csv", rows_to_csv(rows))
    write_text(f"{root}/search.json", json.dumps({"settings": to_dict(settings), "base": base,
                                                   "cache": cache.manifest["source"], "leaderboard": rows},
                                                  indent=1, default=str))
    log(format_leaderboard(rows))
    log(f"search: leaderboard in {root}/leaderboard.csv")
    if settings.refit.topk > 0:
        run_refit(settings, rows, base, cache, log)
    return rows


# ---------------------------------------------------------------------------------------------
# Leaderboard


def leaderboard(results, params, base: dict, fs) -> list[dict]:
    """One row per trial, best first: configuration, best score and epoch, epochs run, status.

    The scores come from each trial's per-epoch record (`trial_history`), the epochs before a
    resume included.
    """
    rows = []
    for result in results:
        values = decode(params, {k: v for k, v in (result.config or {}).items() if not k.startswith("__")})
        epochs_planned = int(values.get("train.epochs", base["train"]["epochs"]))
        frame = result.metrics_dataframe
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        row = {"trial_id": trial_id, "config": " ".join(f"{k}={_short(v)}" for k, v in values.items()),
               "best_score": math.nan, "best_epoch": None, "epochs_run": 0, "status": "failed",
               "checkpoint": "", "error": "", "values": values, "history": [], "time_s": math.nan}
        scored = frame.dropna(subset=["score"]) if frame is not None and "score" in frame else None
        # Per-epoch scores (also the report's learning curves and ASHA's stops).
        row["history"] = trial_history(fs, metrics.get("checkpoint_path"), scored)
        scores = [h for h in row["history"] if not math.isnan(h["score"])]
        if scores:
            best = max(scores, key=lambda h: h["score"])
            row.update(best_score=best["score"], best_epoch=best["epoch"], epochs_run=row["history"][-1]["epoch"])
        if scored is not None and len(scored):
            if "time_total_s" in scored:
                row["time_s"] = float(scored["time_total_s"].max())
            if "timestamp" in scored:
                row["started"] = float(scored["timestamp"].min() - scored["time_total_s"].min())
        if metrics.get("checkpoint_path"):
            row["checkpoint"] = f"{metrics['checkpoint_path']}/best.pt"
        if result.error is not None:
            row["error"] = str(result.error).strip().splitlines()[-1][:300]
        elif row["epochs_run"] >= epochs_planned:
            row["status"] = "finished"
        else:
            row["status"] = "stopped early"
        rows.append(row)
    rows.sort(key=lambda r: (-r["best_score"] if not math.isnan(r["best_score"]) else math.inf))
    return rows


HISTORY_KEYS = ("score", "dice", "hausdorff")


def trial_history(fs, checkpoint_path: str | None, scored) -> list[dict]:
    """Every epoch a trial trained: {epoch (from 1), score, dice, hausdorff}, in order.

    Read from the metrics.jsonl of the trial's latest checkpoint: Tune keeps only what a trial
    reported since it last started, so a trial restarted by a resumed search (its Train run
    continuing from its checkpoint) has lost the epochs before the restart from Tune's record.
    Tune's record (`scored`, its rows with a score) when there is no checkpoint to read.
    """
    def epoch(m) -> dict:
        return {"epoch": int(m["epoch"]) + 1, **{k: float(m[k]) for k in HISTORY_KEYS}}

    if checkpoint_path:
        try:
            with fs.open_input_stream(f"{checkpoint_path}/metrics.jsonl") as f:
                return [epoch(json.loads(line)) for line in f.read().decode().splitlines() if line.strip()]
        except (OSError, ValueError, KeyError):  # gone, unreadable: Tune's record is next best
            pass
    return [] if scored is None else [epoch(r) for _, r in scored.iterrows()]


def _short(value) -> str:
    if isinstance(value, list):
        return "+".join(f"{v['name']}:{v['weight']:g}" if isinstance(v, dict) else str(v) for v in value)
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


LEADERBOARD_COLUMNS = ("trial_id", "status", "best_score", "best_epoch", "epochs_run", "config", "checkpoint", "error")


def rows_to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LEADERBOARD_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def format_leaderboard(rows: list[dict]) -> str:
    shown = [{"trial": r["trial_id"], "status": r["status"], "score": r["best_score"],
              "best epoch": "" if r["best_epoch"] is None else r["best_epoch"], "epochs": r["epochs_run"],
              "configuration": r["config"][:90]} for r in rows]
    return format_table(shown, floats="{:.4f}")


# ---------------------------------------------------------------------------------------------
# Refit: top-k configurations × folds, in parallel Ray Train runs, with out-of-fold probabilities


def run_refit(settings: SearchConfig, rows: list[dict], base: dict, cache, log=say) -> list[dict]:
    import ray.tune

    from search.trial import refit_trial

    top = [r for r in rows if r["status"] != "failed" and not math.isnan(r["best_score"])][: settings.refit.topk]
    if not top:
        log("search: no successful trial to refit")
        return []
    folds = settings.refit.folds if settings.refit.folds is not None else list(range(cache.manifest["folds"]))
    jobs = [{"rank": i, "trial_id": r["trial_id"], "values": r["values"], "fold": f}
            for i, r in enumerate(top) for f in folds]
    root = experiment_root(settings)
    trainable = _trainable(refit_trial, base=base, storage_path=f"{root}/refit_runs", workers=settings.workers,
                           max_failures=settings.max_failures, tta=settings.refit.tta)
    log(f"search: refit of the top {len(top)} configuration(s) on folds {folds}: {len(jobs)} Train runs")
    fs, fs_root = filesystem(root)
    experiment = f"{fs_root}/{REFIT_EXPERIMENT}"
    if ray.tune.Tuner.can_restore(experiment, storage_filesystem=fs):
        tuner = ray.tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True,
                                       storage_filesystem=fs)
    else:
        tuner = ray.tune.Tuner(
            trainable,
            param_space={"job": ray.tune.grid_search(jobs)},
            tune_config=ray.tune.TuneConfig(max_concurrent_trials=concurrent_trials(settings)),
            run_config=ray.tune.RunConfig(name=REFIT_EXPERIMENT, storage_path=fs_root, storage_filesystem=fs,
                                          verbose=1),
        )
    results = tuner.fit()
    refits = []
    for result in results:
        job = result.config["job"]
        metrics = result.metrics or {}
        entry = {"rank": job["rank"], "trial_id": job["trial_id"], "fold": job["fold"], "values": job["values"],
                 "score": metrics.get("score"),
                 "best_epoch": metrics["epoch"] + 1 if metrics.get("stage") == "oof" else None,
                 "error": None if result.error is None else str(result.error).strip().splitlines()[-1][:300]}
        if metrics.get("stage") == "oof" and metrics.get("checkpoint_path"):
            entry["checkpoint"] = f"{metrics['checkpoint_path']}/best.pt"
            entry["oof"] = f"{metrics['checkpoint_path']}/oof"
        refits.append(entry)
    refits.sort(key=lambda e: (e["rank"], e["fold"]))
    write_text(f"{root}/refit.json", json.dumps({"folds": folds, "tta": settings.refit.tta, "models": refits},
                                                indent=1, default=str))
    failed = [e for e in refits if e["error"]]
    log(f"search: refit wrote {len(refits) - len(failed)} fold models with out-of-fold probabilities to "
        f"{root}/refit.json" + (f"; {len(failed)} failed" if failed else ""))
    return refits
