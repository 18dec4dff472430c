"""Where ML teams look (search/tracking.py): the small demo (conftest.small_demo) runs with
`tracking.mlflow: true` into a real SQLite MLflow store, and keeps its Optuna study in optuna.db by
default. Both are read back with the tools' own clients: MLflow's, Optuna's and optuna-dashboard's
HTTP API."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from gitseg import records
from gitseg.records import ENSEMBLE_MANIFEST, REFIT_RECORD, SEARCH_RECORD, EnsembleManifest, RefitRecord, SearchRecord
from gitseg.tracking import KIND, PARENT, TRIAL_ID
from search.tracking import NOT_METRICS

pytestmark = pytest.mark.slow


def mlflow_runs(root: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("demo")
    runs = client.search_runs([experiment.experiment_id])
    by_kind: dict[str, list] = {}
    for run in runs:
        by_kind.setdefault(run.data.tags.get(KIND), []).append(run)
    return client, by_kind


def same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_every_trial_and_refit_run_is_an_mlflow_run_with_the_trials_own_records(small_demo):
    out, _, _ = small_demo
    root = out / "search" / "demo"
    search = records.load(SearchRecord, root / SEARCH_RECORD)
    client, by_kind = mlflow_runs(root)
    (parent,) = by_kind["search"]
    assert parent.info.status == "FINISHED" and parent.data.params["num_samples"] == "3"
    assert parent.data.metrics["best_score"] == search.leaderboard[0].best_score
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"leaderboard.csv", "search.json"}
    for kind in ("trial", "refit", "ensemble", "report"):
        assert all(r.data.tags[PARENT] == parent.info.run_id for r in by_kind[kind]), kind

    # One run per trial: its searched values as parameters, every epoch the trial recorded in its own
    # metrics.jsonl as metric history at step epoch (from 1), its checkpoint, its end.
    trials = {r.data.tags[TRIAL_ID]: r for r in by_kind["trial"]}
    assert set(trials) == {row.trial_id for row in search.leaderboard}
    compared = 0
    for row in search.leaderboard:
        run = trials[row.trial_id]
        assert run.data.params == {k: str(v) for k, v in row.values.items()}
        assert run.info.status == ("FAILED" if row.status == "failed" else "FINISHED"), row
        if not row.checkpoint:
            continue
        assert run.data.tags["checkpoint"] == row.checkpoint
        epochs = [json.loads(line) for line in (Path(row.checkpoint).parent / "metrics.jsonl").read_text().splitlines()]
        keys = [k for k, v in epochs[0].items() if isinstance(v, (int, float)) and k not in NOT_METRICS]
        assert {"score", "dice", "hausdorff", "soft_dice", "train_loss", "dice/stomach"} <= set(keys)
        for key in keys:
            logged = history(client, run.info.run_id, key)
            expected = [(e["epoch"] + 1, float(e[key])) for e in epochs]
            assert len(logged) == len(expected) and all(
                s == t and same(a, b) for (s, a), (t, b) in zip(logged, expected)), (key, logged, expected)
            compared += 1
    assert compared > 20

    # One run per refit (configuration, fold), its checkpoint the refit's model.
    refit = records.load(RefitRecord, root / REFIT_RECORD)
    runs = {(r.data.params["search_trial"], int(r.data.params["fold"])): r for r in by_kind["refit"]}
    assert sorted(runs) == sorted((m.trial_id, m.fold) for m in refit.models)
    for model in refit.models:
        run = runs[(model.trial_id, model.fold)]
        assert run.info.status == "FINISHED" and run.data.tags["checkpoint"] == model.checkpoint
        assert max(v for _, v in history(client, run.info.run_id, "score")) == pytest.approx(model.score)

    # The ensemble's and the report's runs: their figures and files.
    manifest = records.load(EnsembleManifest, root / "ensemble" / ENSEMBLE_MANIFEST)
    # Other tests read the same demo and may write its report again: each such command is one more run.
    ensemble = by_kind["ensemble"][0]  # the latest (search_runs: newest first), the folder as it is now
    assert ensemble.data.metrics["holdout/score"] == pytest.approx(manifest.scores.holdout.score)
    assert ensemble.data.metrics["oof/selected_at_0.5"] == pytest.approx(manifest.scores.oof.selected_at_half)
    assert {a.path for a in client.list_artifacts(ensemble.info.run_id)} >= {ENSEMBLE_MANIFEST, "evaluation.json"}
    for report in by_kind["report"]:
        assert "report/index.html" in {a.path for a in client.list_artifacts(report.info.run_id, "report")}
    # The artefacts live beside the store in the search folder, not in ./mlruns of the working directory.
    assert (root / "mlflow-artifacts").is_dir() and not Path("mlruns").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_optuna_study_is_in_its_database_and_optuna_dashboard_serves_it(small_demo):
    import optuna

    out, stdout, _ = small_demo
    root = out / "search" / "demo"
    url = f"sqlite:///{root / 'optuna.db'}"
    assert f"optuna-dashboard {url}" in stdout
    search = records.load(SearchRecord, root / SEARCH_RECORD)
    study = optuna.load_study(study_name="demo", storage=url)
    assert len(study.trials) == len(search.leaderboard) == 3
    assert sorted(t.params["train.lr"] for t in study.trials) == sorted(r.values["train.lr"]
                                                                        for r in search.leaderboard)
    assert [t.state.name for t in study.trials].count("COMPLETE") == 2  # the diverged trial failed

    port = free_port()
    dashboard = subprocess.Popen([str(Path(sys.executable).parent / "optuna-dashboard"), url, "--port", str(port)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, studies = time.monotonic() + 60, None
        while studies is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as response:
                    studies = json.loads(response.read())["study_summaries"]
            except OSError:
                if time.monotonic() > deadline or dashboard.poll() is not None:
                    raise
                time.sleep(0.5)
        (summary,) = studies
        assert summary["study_name"] == "demo"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}", timeout=10) as r:
            detail = json.loads(r.read())
        served = sorted((t["number"], t["state"].upper(), {p["name"]: p["param_internal_value"] for p in t["params"]})
                        for t in detail["trials"])
        assert served == [(t.number, t.state.name, t.params) for t in study.trials]
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=30)
