"""The search's side of tracking (the search config's `tracking:` section; docs/tracking.md).

- **Optuna's study in a database**: the sampler's trials in an Optuna RDB storage, by default
  `<search folder>/optuna.db`, so that `optuna-dashboard sqlite:///<search folder>/optuna.db` shows
  the search while it runs and after, and a resumed search continues the same study.
- **MLflow** (gitseg/tracking.py): a Tune callback in the driver copies each trial's reports into its
  MLflow run as they arrive, so no metric is computed twice. It holds only names and ids (Tune
  pickles it with the experiment and a resumed search uses it again) and finds a trial's run by its
  tag, so a resumed trial goes on logging into the run it started; at a trial's end, the epochs its
  own record (metrics.jsonl) holds that a dead driver never logged are filled in.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from gitseg.config import to_dict
from gitseg.tracking import KIND, PARENT, TRIAL_ID, Tracker, client_for, find_run, flat
from search.space import decode
from search.storage import filesystem

OPTUNA_DB = "optuna.db"
# Entries of a Tune result that are bookkeeping, not a trial's metrics: Tune's own (time, host,
# iteration) and the epoch counters, which become the metrics' step instead.
NOT_METRICS = {"training_iteration", "time_total_s", "time_this_iter_s", "timestamp", "time_since_restore",
               "iterations_since_restore", "timesteps_since_restore", "timesteps_total", "episodes_total", "pid",
               "done", "epoch", "epochs_done", "fold", "best_epoch"}
STEP_KEY = "score"  # every epoch reports it: the steps a run holds are the steps of its score


def optuna_storage(settings, root: str):
    """The Optuna storage of a search (None: in memory) and its URL for the dashboard."""
    choice = settings.tracking.optuna_storage
    if choice == "memory" or (choice == "sqlite" and "://" in root):
        return None, None
    import optuna  # heavy: only a search driver

    url = f"sqlite:///{Path(root).resolve() / OPTUNA_DB}" if choice == "sqlite" else choice
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(url), url


def forget_study(storage, name: str) -> None:
    """A search that starts afresh (no Tune experiment to resume) starts a fresh study of its name:
    an old study left in the database would otherwise lend the sampler trials of another search."""
    import optuna  # heavy

    try:
        optuna.delete_study(study_name=name, storage=storage)
    except KeyError:  # no such study: nothing to forget
        pass


def start_tracker(settings, root: str, resume: bool, log) -> Tracker | None:
    """The search's MLflow parent run (None when tracking.mlflow is off), its settings as parameters."""
    return Tracker.start(to_dict(settings.tracking), settings.name, root, resume,
                         flat({k: v for k, v in to_dict(settings).items() if k != "space"}), log)


def result_metrics(result: dict) -> dict:
    """The trial's own metrics in a Tune result: its numbers, less Tune's bookkeeping."""
    return {k: float(v) for k, v in result.items()
            if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def trial_logger(tracker: Tracker, kind: str, params=None):
    """The Tune callback: a child run per trial (`kind` search trial or refit run), its parameters the
    trial's configuration (a search trial's searched values decoded with `params`; a refit run's
    configuration and fold), every reported epoch as metrics at step epoch (from 1), and at the end
    the checkpoint's path and the run's status."""
    import ray.tune  # heavy: Tune's callback base class

    class TrialLogger(ray.tune.Callback):
        def __init__(self):
            self.tracker, self.kind, self.params = tracker, kind, params
            self.runs, self.logged = {}, {}

        def __getstate__(self):
            return {"tracker": self.tracker, "kind": self.kind, "params": self.params, "runs": {}, "logged": {}}

        def config_params(self, config: dict) -> dict:
            if self.kind == "refit":
                job = config["job"]
                return {**{k: str(v) for k, v in job["values"].items()}, "fold": job["fold"],
                        "search_trial": job["trial_id"], "rank": job["rank"]}
            return decode(self.params, {k: v for k, v in config.items() if not k.startswith("__")})

        def run_of(self, trial) -> str:
            """The trial's run (found by its tags after a resume, else new) and the epochs it holds."""
            if trial.trial_id not in self.runs:
                client = client_for(self.tracker.uri)
                run = find_run(client, self.tracker.experiment, **{KIND: self.kind, TRIAL_ID: trial.trial_id,
                                                                    PARENT: self.tracker.parent})
                if run is None:
                    config = self.config_params(trial.config)
                    name = (f"{trial.trial_id} fold {config['fold']}" if self.kind == "refit" else trial.trial_id)
                    run = self.tracker.child(self.kind, name, config, **{TRIAL_ID: trial.trial_id})
                self.runs[trial.trial_id] = run
                self.logged[trial.trial_id] = {m.step for m in client.get_metric_history(run, STEP_KEY)}
            return self.runs[trial.trial_id]

        def log_epoch(self, trial, step: int, metrics: dict, stamp_ms: int) -> None:
            """One epoch's metrics at `step`, once: a trial restarted after its last epoch reports it again."""
            from mlflow.entities import Metric  # heavy

            run = self.run_of(trial)
            if step in self.logged[trial.trial_id]:
                return
            client_for(self.tracker.uri).log_batch(run, metrics=[Metric(k, v, stamp_ms, step)
                                                                 for k, v in metrics.items()])
            self.logged[trial.trial_id].add(step)

        def on_trial_start(self, iteration, trials, trial, **info):
            self.run_of(trial)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result.get("checkpoint_path"):
                client_for(self.tracker.uri).set_tag(self.run_of(trial), "checkpoint",
                                                     f"{result['checkpoint_path']}/best.pt")
            if result.get("stage") == "oof" or "epoch" not in result:  # a refit's last report: its best epoch again
                return
            self.log_epoch(trial, int(result["epoch"]) + 1, result_metrics(result),
                           int(result.get("timestamp", time.time()) * 1000))

        def end(self, trial, status: str):
            """The epochs the trial's own record (metrics.jsonl) holds and the run lacks (reported to a driver
            that died before it logged them), then the run's status."""
            run = self.run_of(trial)
            checkpoint = (trial.last_result or {}).get("checkpoint_path")
            for epoch in epoch_records(self.tracker.root, checkpoint):
                self.log_epoch(trial, int(epoch["epoch"]) + 1, result_metrics(epoch), int(time.time() * 1000))
            client_for(self.tracker.uri).set_terminated(run, status)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.end(trial, "FINISHED")

        def on_trial_error(self, iteration, trials, trial, **info):
            self.end(trial, "FAILED")

    return TrialLogger()


def epoch_records(root: str, checkpoint_path: str | None) -> list[dict]:
    """The epochs in a checkpoint's metrics.jsonl (the trial's own record); none when it cannot be read."""
    if not checkpoint_path:
        return []
    fs, _ = filesystem(root)
    try:
        with fs.open_input_stream(f"{checkpoint_path}/metrics.jsonl") as f:
            return [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []
