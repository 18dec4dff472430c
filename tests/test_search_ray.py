"""Every test that starts Ray, in one file: they must not run beside other Ray work (`ray stop
--force` stops every Ray process on the machine).

The search on a real local Ray instance: Tune + Optuna + ASHA over 2-worker DDP trials on CPU.
The small demo (conftest.small_demo) gives the search, refit, ensemble, report and console that
most tests here read; the kill test runs the search in its own processes, so a killed driver, a
fresh resume and a Ray head started with `ray start --head` are all real.
"""

import csv
import json
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ENV, RAY, write_configs

from gitseg import records
from gitseg.checkpoint import load_checkpoint
from gitseg.oof import oof_file
from gitseg.records import REFIT_RECORD, SEARCH_RECORD, RefitRecord, SearchRecord

pytestmark = pytest.mark.slow
SECTIONS = ("Data", "Search", "Cross-validation of the refit configurations", "Ensemble", "Holdout evaluation",
            "Overlays", "Review list", "Reproducibility")


def test_shortened_demo_runs_every_stage(small_demo):
    out, stdout, _ = small_demo
    for stage in ("synth", "prepare", "search + refit", "ensemble", "report"):
        assert f"demo: {stage} done" in stdout
    run = out / "search" / "demo"
    headline = json.loads((run / "demo.json").read_text())
    assert 0 <= headline["holdout_score"] <= 1 and headline["holdout_case_days"] > 0
    assert "holdout score (kaggle convention" in stdout and str(run / "report" / "index.html") in stdout
    assert (run / "ensemble" / "ensemble.json").is_file()


def test_the_console_reads_like_a_tool_and_the_rest_is_in_the_log(small_demo):
    out, stdout, stderr = small_demo
    terminal = stdout + stderr
    # Stage lines, progress bars (carriage-return updates of one line each), the leaderboard, the
    # failed trial's reason and the results; the demo itself prints 38 lines at full size.
    assert len(terminal.splitlines()) <= 60, terminal
    assert len(re.findall(r"^\s*trial\s+status\s+score", stdout, re.M)) == 1, stdout  # the leaderboard, once
    assert re.search(r"search: trial \w+ failed: .*loss is", terminal)
    for noise in ("RayTrainWorker", "TrainController", "metrics={", "Trial status", "INFO", "WARNING"):
        assert noise not in terminal, noise
    log = out / "demo.log"
    assert f"is in {log}; --verbose" in stdout
    text = log.read_text()
    assert "RayTrainWorker" in text and "fit: fold 0 epoch 1/3" in text and "Trial status" in text


def test_report_has_every_section_and_no_network_reference(small_demo):
    out, _, _ = small_demo
    report = out / "search" / "demo" / "report"
    page = (report / "index.html").read_text()
    for heading in SECTIONS:
        assert f">{heading}</h2>" in page, heading
    for table in ("Leaderboard", "Ablation on the holdout", "95% bootstrap intervals", "Per case-day, worst first",
                  "Versions", "Timings", "Failed trials", "Post-processing tuned"):
        assert table in page, table
    assert "kaggle convention" in page
    # Every src/href is a file in the report folder: nothing is fetched from a network.
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert refs and all(not re.match(r"^[a-z]+:|^//", r) for r in refs)
    for ref in refs:
        if not ref.startswith("#"):
            assert (report / ref).is_file(), ref
    assert not re.search(r"https?://|@import|<script", page)
    for fig in ("learning_curves", "best_so_far", "anytime", "parameter_effects", "overlay_worst", "overlay_best",
                "review_scatter", "review_overlay"):
        assert (report / "figures" / f"{fig}.png").is_file(), fig
    md = (report / "report.md").read_text()
    assert all(f"## {heading}" in md for heading in SECTIONS)
    assert (report / "tables" / "ablation.csv").is_file() and (report / "tables" / "leaderboard.csv").is_file()


def test_distill_gives_a_folder_predict_uses_in_process_and_over_ray(small_demo, tmp_path):
    """`gitseg distill` with pseudo-labels on the demo's ensemble: Train runs that learn from the teacher
    folder, a one-network folder with its holdout table, and `gitseg predict` with it; the ensemble
    spread over Ray gives the submission it gives in process. One Ray instance serves it all. Without
    the labels-only reference (--no-reference: half the Train runs; the four-row table and the
    teacher's content are tested without Ray in test_ensemble.py)."""
    import ray

    from ensemble.predict.tree import predict_tree
    from gitseg.cli import main
    from gitseg.teacher import Teacher

    out, _, _ = small_demo
    ensemble, data, quiet = out / "search" / "demo" / "ensemble", out / "data", dict(log=lambda *_: None)
    student = {"data": {"channels": 3, "stride": 1, "augment": 0.0},
               "model": {"arch": "FPN", "encoder": "tu-test_resnet", "head_prior": None},
               "train": {"epochs": 1, "batch_size": 8, "max_steps_per_epoch": 4, "lr": 0.003, "teacher_weight": 0.5}}
    (tmp_path / "student.yaml").write_text(json.dumps(student))
    # Room for both fold runs of the student at once (the demo's search runs 2 trials at a time: 2 x
    # (2 workers + a driver's 0.01 CPU)): overlapping their start-ups saves about 8 s here.
    ray.init(num_cpus=5)
    try:
        assert main(["distill", "--ensemble", str(ensemble), "--config", str(tmp_path / "student.yaml"),
                     "--out", str(tmp_path / "student"), "--pseudo-labels", "--no-reference"]) == 0
        folder = tmp_path / "student"
        manifest = json.loads((folder / "ensemble.json").read_text())
        assert len(manifest["members"]) == 1 and manifest["selection"]["method"] == "distilled"
        result = json.loads((folder / "distill.json").read_text())
        assert [r["model"] for r in result["models"]] == ["student", "best single model", "ensemble"]
        assert all(r["ms_per_slice"] > 0 and 0 <= r["score"] <= 1 for r in result["models"])
        teacher = Teacher(tmp_path / "student.work" / "teacher")
        assert teacher.pseudo and all(cd.startswith("case") for cd in teacher.pseudo)
        # The student trained on every fold from the teacher folder, each fold run with its OOF.
        refit = records.load(RefitRecord, tmp_path / "student.work" / REFIT_RECORD)
        assert sorted((m.rank, m.fold) for m in refit.models if m.checkpoint and m.oof) == [(0, 0), (0, 1)]
        assert {m.values["data.teacher"] for m in refit.models} == {str(teacher.folder.resolve())}
        config = load_checkpoint(Path(refit.models[0].checkpoint))["config"]
        assert config["data"]["teacher"] == str(teacher.folder.resolve()) and config["train"]["teacher_weight"] == 0.5
        assert predict_tree(folder, data, tmp_path / "student-pred", **quiet)["written"]
        local = predict_tree(ensemble, data, tmp_path / "local", **quiet)
        spread = predict_tree(ensemble, data, tmp_path / "ray", ray_address="auto", **quiet)
        assert local["written"] and spread["written"] == local["written"] and not spread["failed"]
        assert Path(spread["submission"]).read_text() == Path(local["submission"]).read_text()
    finally:
        ray.shutdown()


def test_robustness_on_the_demo_ensemble_gives_its_table_figure_and_report_section(small_demo, tmp_path):
    """`gitseg robustness` on the demo's ensemble (two corruptions at one severity: the test's share)."""
    from gitseg.cli import main

    out, _, _ = small_demo
    run = out / "search" / "demo"
    ensemble = tmp_path / "ensemble"
    shutil.copytree(run / "ensemble", ensemble)
    assert main(["robustness", "--ensemble", str(ensemble), "--corruptions", "bias_field", "spike",
                 "--severities", "3"]) == 0
    result = json.loads((ensemble / "robustness" / "robustness.json").read_text())
    assert [(r["corruption"], r["severity"]) for r in result["table"]] == [("clean", 0), ("bias_field", 3),
                                                                          ("spike", 3)]
    # The clean score is the demo's holdout score (raw scans read and preprocessed as prepare did); a
    # few voxels may differ with the thread count of this process.
    assert result["clean_score"] == pytest.approx(json.loads((run / "demo.json").read_text())["holdout_score"],
                                                  abs=2e-3)
    assert (ensemble / "robustness" / "figures" / "robustness.png").is_file()
    assert main(["report", "--run", str(run), "--ensemble", str(ensemble), "--out", str(tmp_path / "report")]) == 0
    assert ">Robustness</h2>" in (tmp_path / "report" / "index.html").read_text()


def run_search(config: Path, *extra, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search", "--config", str(config), *extra], env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def leaderboard(root: Path) -> list[dict]:
    with open(root / "leaderboard.csv") as f:
        return list(csv.DictReader(f))


def trial_results(root: Path, experiment: str = "tune") -> dict[str, list[dict]]:
    """Every result Tune recorded, per trial id, for the search (tune) or the refit experiment."""
    out = {}
    for path in (root / experiment).glob("*/result.json"):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if lines:
            out[lines[0]["trial_id"]] = lines
    return out


def test_search_asha_failure_and_refit(small_demo):
    # Three configurations (conftest.small_demo): the base learns, lr 1e-7 learns nothing and ASHA
    # stops it at its first rung, lr 1e30 diverges and the trial fails; then the refit of the best.
    out, _, _ = small_demo
    root = out / "search" / "demo"
    rows = leaderboard(root)
    assert len(rows) == 3
    status = [r["status"] for r in rows]
    assert sorted(status) == ["failed", "finished", "stopped early"], rows
    failed = next(r for r in rows if r["status"] == "failed")
    assert "train.lr=1e+30" in failed["config"] and "loss is" in failed["error"]
    best = rows[0]
    assert best["status"] == "finished" and float(best["best_score"]) > 0
    assert Path(best["checkpoint"]).is_file()
    stopped = next(r for r in rows if r["status"] == "stopped early")
    assert "train.lr=1e-07" in stopped["config"] and int(stopped["epochs_run"]) < 3
    # Multi-objective: each trial that trained reported its measured latency; the front is marked and
    # the refit (select: pareto, topk 1) took the front's best score.
    assert float(best["latency_ms"]) > 0 and float(stopped["latency_ms"]) > 0 and failed["latency_ms"] == ""
    assert best["pareto"] == "True"
    record = records.load(SearchRecord, root / SEARCH_RECORD)
    assert record.compute == {"trial_epochs": sum(int(r["epochs_run"]) for r in rows), "budget_trial_epochs": 100,
                              "budget_wall_s": None}
    assert record.settings["objectives"] == ["score", "latency"] and record.settings["refit"]["select"] == "pareto"
    front = [r for r in record.leaderboard if r.pareto]
    for r in front:  # no trial dominates a front trial
        assert not any(o.best_score >= r.best_score and o.latency_ms <= r.latency_ms
                       and (o.best_score, o.latency_ms) != (r.best_score, r.latency_ms)
                       for o in record.leaderboard if o.latency_ms is not None)

    # Refit: one model and one set of out-of-fold probabilities per fold, holdout never used.
    from gitseg.checkpoint import load_checkpoint, model_from_checkpoint
    from gitseg.data.cache import Cache

    cache = Cache(out / "cache")
    refit = records.load(RefitRecord, root / REFIT_RECORD)
    assert [(m.rank, m.fold) for m in refit.models] == [(0, 0), (0, 1)]
    for model in refit.models:
        assert model.trial_id == best["trial_id"] and model.error is None
        state = load_checkpoint(model.checkpoint)
        assert state["fold"] == model.fold
        model_from_checkpoint(state)
        oof = sorted(p.stem for p in Path(model.oof).glob("*.npz"))
        assert oof == sorted(cache.case_days(folds=[model.fold]))
        assert not set(oof) & set(cache.case_days(holdout=True))
        probs = np.load(oof_file(model.oof, oof[0]))["probs"]  # as stored: uint8 steps of 1/255
        entry = cache.entries[oof[0]]
        assert probs.shape == (3, entry["slices"], entry["height"], entry["width"]) and probs.dtype == np.uint8
    # On the search fold the refit continued the finished trial's run instead of training again:
    # it reported the trial's last epoch once, then its OOF (fold 1 trained 3 epochs, then OOF),
    # and its model is the trial's best model.
    reported = {lines[0]["config"]["job"]["fold"]: [r.get("stage") for r in lines]
                for lines in trial_results(root, experiment="refit").values()}
    assert reported == {0: [None, "oof"], 1: [None, None, None, "oof"]}
    trial_state, refit_state = (load_checkpoint(path) for path in (best["checkpoint"], refit.models[0].checkpoint))
    assert all(torch.equal(trial_state["model"][k], refit_state["model"][k]) for k in trial_state["model"])


def trained_epochs(root: Path) -> dict[str, int]:
    """Epochs in each trial's latest Ray Train checkpoint recorded in checkpoint_manager_snapshot.json."""
    out = {}
    for run in (root / "train_runs").glob("trial-*"):
        snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
        epochs = [r["metrics"]["epochs_done"] for r in snapshot.get("checkpoint_results", [])
                  if (run / r["checkpoint_dir_name"] / "metrics.jsonl").is_file()]
        if epochs:
            out[run.name[len("trial-"):]] = max(epochs)
    return out


def epoch_lines(root: Path, trial: str) -> list[str]:
    """metrics.jsonl of a trial's latest Ray Train checkpoint: one line per epoch trained."""
    latest = max((p for p in (root / "train_runs" / f"trial-{trial}").glob("checkpoint_*") if p.is_dir()),
                 key=lambda p: p.name)
    return (latest / "metrics.jsonl").read_text().splitlines()


# The search's driver, killed (SIGKILL, as a crashed or evicted head would be) by a Tune callback at
# a chosen event rather than by a timer: the second trial's report of epoch `epochs`, once per marker
# file. Tune stores its callbacks with the experiment, so the resumed search carries this one on:
# the first run dies in the second trial's first epoch, the second run when that trial has reported
# its last epoch (its checkpoint is recorded before Tune hears of it, and the trial has not finished),
# the third run finishes.
KILLED_SEARCH = """
import os, signal, sys
import ray.tune
from search.run import run_search
from search.settings import load_search_config

class KillDriver(ray.tune.Callback):
    def __init__(self, kills):
        self.kills = kills

    def on_trial_result(self, iteration, trials, trial, result, **info):
        for epochs, marker in self.kills:
            if trials.index(trial) == 1 and result["epochs_done"] == epochs and not os.path.exists(marker):
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)

config, folder = sys.argv[1:]
run_search(load_search_config(config), callbacks=[KillDriver([(1, folder + "/kill-1"), (2, folder + "/kill-2")])])
"""


@pytest.mark.faults  # about 2 minutes: in `make test-faults` with the multi-node tests, not in `make test`
def test_killed_driver_resumes_and_a_job_on_a_head_node_finishes_it(train_cache, tmp_path):
    # Killed twice, resumed twice: the last resume is `ray job submit ... python -m search` on a Ray
    # head started with `ray start --head`, as on a cluster (the search's storage is what it resumes
    # from, whichever Ray instance runs the driver).
    config = write_configs(tmp_path, train_cache, "resume", epochs=2, num_samples=2,
                           asha={"enabled": False}, space={"train.lr": {"loguniform": [1e-3, 5e-3]}},
                           refit={"topk": 0}, tracking={"mlflow": True})
    root = tmp_path / "storage" / "resume"
    script = tmp_path / "killed_search.py"
    script.write_text(KILLED_SEARCH)

    def search(run: int) -> subprocess.CompletedProcess:
        # Tune saves its experiment state every few seconds by default; at every step here, so that
        # what it saved is what it had seen when the driver died. It also means a kill can land while
        # that state is being written: before search/storage.py replaced files whole, that left a
        # truncated experiment_state-*.json, and Tune silently started over.
        done = subprocess.run([sys.executable, str(script), str(config), str(tmp_path)],
                              env={**ENV, "TUNE_GLOBAL_CHECKPOINT_S": "0"}, capture_output=True, text=True,
                              timeout=600)
        (tmp_path / f"run-{run}.log").write_text(done.stdout + done.stderr)  # kept for a failure's diagnosis
        # What is left of the dead driver's local Ray instance goes too. `ray stop` ends every Ray
        # process on the machine: these tests must not run beside other Ray work.
        subprocess.run([RAY, "stop", "--force"], env=ENV, capture_output=True)
        return done

    first = search(1)
    assert first.returncode == -9, first.stdout[-3000:] + first.stderr[-3000:]
    epochs = trained_epochs(root)
    (finished,) = [t for t, n in epochs.items() if n == 2]
    (interrupted,) = [t for t, n in epochs.items() if n == 1]
    checkpoints = sorted(p.name for p in (root / "train_runs" / f"trial-{finished}").glob("checkpoint_*"))
    first_epoch = epoch_lines(root, interrupted)[0]

    second = search(2)
    assert second.returncode == -9, second.stdout[-3000:] + second.stderr[-3000:]
    assert "search: resuming" in second.stdout
    # The interrupted trial continued from its checkpoint: its metrics start with the very epoch-1
    # line written before the kill (a retrained epoch 1 would differ, in its timings at least).
    assert trained_epochs(root) == {finished: 2, interrupted: 2}
    assert epoch_lines(root, interrupted)[:1] == [first_epoch], "the interrupted trial restarted instead of resuming"

    # Restarted after its last epoch, the trial has nothing left to train: it reports that epoch again.
    # Ray >= 2.59 requires token authentication on a started cluster: one token for head and client.
    env = {**ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "TUNE_GLOBAL_CHECKPOINT_S": "0"}
    start = subprocess.run([RAY, "start", "--head", "--num-cpus", "3", "--port", "6391",
                            "--dashboard-port", "8291", "--include-dashboard", "true", "--disable-usage-stats"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        job = subprocess.run([RAY, "job", "submit", "--address", "http://127.0.0.1:8291", "--",
                              sys.executable, "-m", "search", "--config", str(config)],
                             env=env, capture_output=True, text=True, timeout=400)
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
    (tmp_path / "run-3.log").write_text(job.stdout + job.stderr)
    assert job.returncode == 0 and "succeeded" in job.stdout, job.stdout[-3000:] + job.stderr[-3000:]
    # The job's output is the command's own lines; Ray's, Tune's and the workers' are in the run's log.
    assert "search: resuming" in job.stdout and "RayTrainWorker" not in job.stdout
    assert "RayTrainWorker" in (root / "search.log").read_text()
    run = root / "train_runs" / f"trial-{finished}"  # never trained again: no new checkpoint
    assert sorted(p.name for p in run.glob("checkpoint_*")) == checkpoints
    assert [r["epochs_done"] for r in trial_results(root)[finished]] == [1, 2]
    rows = leaderboard(root)
    assert len(rows) == 2 and all(r["status"] == "finished" for r in rows), (
        [{k: r[k] for k in ("trial_id", "status", "epochs_run", "error")} for r in rows],
        {p.parent.name: p.read_text()[-2000:] for p in (root / "tune").glob("*/error.txt")},
        job.stdout[-3000:], job.stderr[-2000:])
    assert trained_epochs(root) == {finished: 2, interrupted: 2}
    # Tune's record of the restarted trial starts at its restart; the leaderboard still has the
    # epoch trained before the first kill, and ranks the trial by its best epoch of the two.
    row = next(r for r in records.load(SearchRecord, root / SEARCH_RECORD).leaderboard if r.trial_id == interrupted)
    trained = [json.loads(line) for line in epoch_lines(root, interrupted)]
    assert [h["epoch"] for h in row.history] == [1, 2]
    assert row.best_score == max(m["score"] for m in trained)

    # The Optuna study and the MLflow runs went on across both kills (search/tracking.py): one study
    # trial per search trial, both complete; one MLflow run per trial under the one search run, the
    # interrupted trial's holding each epoch once, as its own metrics.jsonl does.
    import optuna
    from mlflow.tracking import MlflowClient

    study = optuna.load_study(study_name="resume", storage=f"sqlite:///{root / 'optuna.db'}")
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "COMPLETE"]
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    kinds = sorted(r.data.tags["gitseg.kind"] for r in runs)
    assert kinds == ["search", "trial", "trial"], kinds
    (run,) = [r for r in runs if r.data.tags.get("gitseg.trial_id") == interrupted]
    assert sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "score")) == [
        (m["epoch"] + 1, m["score"]) for m in trained]
    assert all(r.info.status == "FINISHED" for r in runs)
