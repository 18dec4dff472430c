"""MLflow, where ML teams follow their runs (the search config's `tracking:` section; docs/tracking.md).

The search is a parent run; its trials and refit runs (search/tracking.py logs them from the
search's driver), `gitseg ensemble` and `gitseg report` are child runs of it. Everything here
reaches the store through MLflow's client; a `Tracker` holds only names and ids, so that Tune can
pickle the callback that carries it and a resumed search logs on into the same runs.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

from gitseg import records
from gitseg.config import ConfigError
from gitseg.records import SEARCH_RECORD, SearchRecord

MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlflow-artifacts"
KIND, TRIAL_ID, PARENT = "gitseg.kind", "gitseg.trial_id", "mlflow.parentRunId"


def mlflow_uri(tracking: dict, root: str) -> str:
    """The store of a search whose `tracking:` section is `tracking`, its folder `root`."""
    if tracking.get("mlflow_uri"):
        return tracking["mlflow_uri"]
    if "://" in root:
        raise ConfigError("tracking.mlflow: a search on an object store needs tracking.mlflow_uri (an MLflow "
                          "server, e.g. http://head-node:5000): there is no local folder for the SQLite store")
    return f"sqlite:///{Path(root).resolve() / MLFLOW_DB}"


_CLIENTS: dict[str, object] = {}  # one client per store and process: opening a SQL store checks its schema


def client_for(uri: str):
    if uri in _CLIENTS:
        return _CLIENTS[uri]
    try:
        from mlflow.tracking import MlflowClient  # heavy and optional: only where tracking is on
    except ImportError as error:
        raise ConfigError("tracking.mlflow needs MLflow: pip install 'gitseg[tracking]' (or set tracking.mlflow: "
                          "false)") from error
    _CLIENTS[uri] = MlflowClient(tracking_uri=uri)
    return _CLIENTS[uri]


def experiment_id(client, name: str, root: str, uri: str) -> str:
    """The experiment's id, created on first use; with the default SQLite store its files go beside
    it in the search folder (MLflow's own default is ./mlruns of whatever folder the driver ran in)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = (Path(root).resolve() / MLFLOW_ARTIFACTS).as_uri() if uri.startswith("sqlite:") else None
    return client.create_experiment(name, artifact_location=location)


def find_run(client, experiment: str, **tags) -> str | None:
    """The latest run of `experiment` with all of `tags` (None: none)."""
    where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([experiment], filter_string=where, order_by=["attributes.start_time DESC"],
                              max_results=1)
    return runs[0].info.run_id if runs else None


def flat(values: dict, prefix: str = "") -> dict:
    """Nested config values as MLflow parameters: dotted keys, values as text."""
    out = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


class Tracker:
    """The search's MLflow parent run and how to reach it; picklable (names and ids only)."""

    def __init__(self, uri: str, root: str, experiment: str, parent: str):
        self.uri, self.root, self.experiment, self.parent = uri, root, experiment, parent

    @classmethod
    def start(cls, tracking: dict, name: str, root: str, resume: bool, params: dict, log) -> Tracker | None:
        """The search's parent run: the latest one of search `name` when it resumes, else a new one
        with `params` (the search's settings). None when tracking is off."""
        if not tracking.get("mlflow"):
            return None
        uri = mlflow_uri(tracking, root)
        client = client_for(uri)
        experiment = experiment_id(client, tracking.get("experiment") or name, root, uri)
        parent = find_run(client, experiment, **{KIND: "search"}) if resume else None
        if parent is None:
            parent = client.create_run(experiment, run_name=name, tags={KIND: "search"}).info.run_id
            log_params(client, parent, params)
        log(f"search: MLflow run {parent} in {uri} (experiment {tracking.get('experiment') or name})")
        return cls(uri, root, experiment, parent)

    @classmethod
    def of_search(cls, settings: dict, root: str) -> Tracker | None:
        """The tracker of a finished search from its recorded settings (search.json), for the ensemble
        and the report; None when the search did not track or its run cannot be found."""
        tracking = settings.get("tracking") or {}
        if not tracking.get("mlflow"):
            return None
        uri = mlflow_uri(tracking, root)
        client = client_for(uri)
        experiment = experiment_id(client, tracking.get("experiment") or settings["name"], root, uri)
        parent = find_run(client, experiment, **{KIND: "search"})
        return None if parent is None else cls(uri, root, experiment, parent)

    def child(self, kind: str, name: str, params: dict | None = None, **tags) -> str:
        client = client_for(self.uri)
        run = client.create_run(self.experiment, run_name=name, tags={KIND: kind, PARENT: self.parent, **tags})
        if params:
            log_params(client, run.info.run_id, params)
        return run.info.run_id

    def finish_search(self, root: str, rows) -> None:
        """The leaderboard's figures and files on the parent run."""
        client = client_for(self.uri)
        best = next((r for r in rows if not math.isnan(r.best_score)), None)
        if best is not None:
            client.log_metric(self.parent, "best_score", best.best_score)
        client.log_metric(self.parent, "trials", len(rows))
        for name in ("leaderboard.csv", "search.json"):
            if Path(root, name).is_file():
                client.log_artifact(self.parent, str(Path(root, name)))

    def end(self) -> None:
        client_for(self.uri).set_terminated(self.parent, "FINISHED")


def log_params(client, run_id: str, params: dict) -> None:
    from mlflow.entities import Param  # heavy

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per batch
        client.log_batch(run_id, params=items[i:i + 100])


def metric_key(name: str) -> str:
    """A figure's name as an MLflow metric key (letters, digits, _ - . space : / only): the ablation's
    "ensemble + TTA + tuned post-processing" becomes "ensemble with TTA with tuned post-processing"."""
    return re.sub(r"[^\w\-. :/]", "", name.replace(" + ", " with "))


def log_figures(tracker: Tracker, run_id: str, figures: dict, step: int = 0) -> None:
    from mlflow.entities import Metric  # heavy

    now = int(time.time() * 1000)
    metrics = [Metric(metric_key(k), float(v), now, step) for k, v in figures.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)]
    client = client_for(tracker.uri)
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])


def log_stage(run_dir, kind: str, params: dict, figures: dict, files: list[Path], log) -> None:
    """A child run `kind` (ensemble, report) of the search in `run_dir` when that search tracked to
    MLflow: its parameters, figures and files. The stage's own folder is already complete: a store
    that cannot be reached is reported, not raised."""
    search = records.load(SearchRecord, Path(run_dir) / SEARCH_RECORD)
    if not search.settings.get("tracking", {}).get("mlflow"):
        return
    try:
        tracker = Tracker.of_search(search.settings, str(Path(run_dir)))
        if tracker is None:
            log(f"{kind}: the search's MLflow run was not found; nothing logged")
            return
        run = tracker.child(kind, kind, params)
        log_figures(tracker, run, figures)
        client = client_for(tracker.uri)
        for path in files:
            if path.is_dir():
                client.log_artifacts(run, str(path), artifact_path=path.name)
            elif path.is_file():
                client.log_artifact(run, str(path))
        client.set_terminated(run, "FINISHED")
        log(f"{kind}: logged to MLflow run {run} ({tracker.uri})")
    except Exception as error:  # noqa: BLE001 - any store failure: the folder stands, say why it was not logged
        log(f"{kind}: not logged to MLflow ({type(error).__name__}: {error}); the {kind} folder is complete")


def ensemble_figures(manifest) -> dict:
    """The ensemble's OOF and holdout figures as MLflow metrics."""
    scores = manifest.scores
    figures = {"oof/selected_at_0.5": scores.oof.selected_at_half, "members": len(manifest.members)}
    figures.update({f"oof/{k}": v for k, v in (scores.oof.tuned or {}).items()})
    if scores.holdout is not None:
        h = scores.holdout
        figures.update({"holdout/score": h.score, "holdout/dice": h.dice, "holdout/hausdorff": h.hausdorff})
        figures.update({f"holdout/{r.variant}": r.score for r in h.ablation})
    return figures
