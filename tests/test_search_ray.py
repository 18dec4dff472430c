"""The search on a real local Ray instance: Tune + Optuna + ASHA over 2-worker DDP trials on CPU.

Each test runs the search as a user would, in its own process (`python -m search`), so a killed
driver, a fresh resume and a Ray head started with `ray start --head` are all real.
"""

import csv
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from gitseg import records
from gitseg.oof import oof_file
from gitseg.records import REFIT_RECORD, SEARCH_RECORD, RefitRecord, SearchRecord

pytestmark = pytest.mark.slow
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"}
RAY = str(Path(sys.executable).parent / "ray")  # the venv's CLI; CI does not put .venv/bin on PATH


def write_configs(tmp: Path, cache: Path, name: str, epochs: int, **settings) -> Path:
    base = {"out": str(tmp / "unused"),
            "data": {"cache": str(cache), "channels": 3, "stride": 1, "augment": 0.0},
            # smp's head init: 4 steps at lr 3e-3 already draw masks that score above 0 after one
            # epoch, so ASHA has a difference to act on; from the 1% head prior they need more steps
            # than these tests can afford (every trial would score 0, and ASHA does not stop ties)
            "model": {"arch": "Unet", "encoder": "tu-test_resnet", "head_prior": None},
            "train": {"epochs": epochs, "batch_size": 8, "max_steps_per_epoch": 4, "lr": 0.003}}
    (tmp / "base.yaml").write_text(yaml.safe_dump(base))
    search = {"name": name, "base": str(tmp / "base.yaml"), "storage_path": str(tmp / "storage"),
              "num_cpus": 3, "seed": 0, "max_failures": 0,
              "workers": {"num_workers": 2, "cpus_per_worker": 1},
              "asha": {"grace_period": 1, "reduction_factor": 2},
              "space": {"train.lr": {"loguniform": [1e-7, 1e30]}}, **settings}
    path = tmp / "search.yaml"
    path.write_text(yaml.safe_dump(search))
    return path


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


def test_search_asha_failure_and_refit(train_cache, tmp_path):
    # Three configurations first: the base (learns), lr 1e-7 (learns nothing: ASHA stops it at
    # its first rung) and lr 1e30 (diverges: the trial fails), then one TPE suggestion.
    config = write_configs(tmp_path, train_cache, "e2e", epochs=3, num_samples=4,
                           points=[{"train.lr": 1e-7}, {"train.lr": 1e30}], refit={"topk": 1, "folds": [0, 1]})
    done = run_search(config)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    root = tmp_path / "storage" / "e2e"
    rows = leaderboard(root)
    assert len(rows) == 4
    status = [r["status"] for r in rows]
    assert "finished" in status and "stopped early" in status and "failed" in status
    failed = next(r for r in rows if r["status"] == "failed")
    assert "train.lr=1e+30" in failed["config"] and "loss is" in failed["error"]
    best = rows[0]
    assert best["status"] == "finished" and float(best["best_score"]) > 0
    assert Path(best["checkpoint"]).is_file()
    stopped = [r for r in rows if r["status"] == "stopped early"]
    assert all(int(r["epochs_run"]) < 3 for r in stopped)

    # Refit: one model and one set of out-of-fold probabilities per fold, holdout never used.
    from gitseg.checkpoint import load_checkpoint, model_from_checkpoint
    from gitseg.data.cache import Cache

    cache = Cache(train_cache)
    refit = records.load(RefitRecord, root / REFIT_RECORD)
    assert [(m.rank, m.fold) for m in refit.models] == [(0, 0), (0, 1)]
    for model in refit.models:
        assert model.trial_id == best["trial_id"] and model.error is None
        state = load_checkpoint(model.checkpoint)
        assert state["fold"] == model.fold
        model_from_checkpoint(state)
        oof = sorted(p.stem for p in Path(model.oof).glob("*.npy"))
        assert oof == sorted(cache.case_days(folds=[model.fold]))
        assert not set(oof) & set(cache.case_days(holdout=True))
        probs = np.load(oof_file(model.oof, oof[0]))  # as stored: float16
        entry = cache.entries[oof[0]]
        assert probs.shape == (3, entry["slices"], entry["height"], entry["width"]) and probs.dtype == np.float16
        assert 0 <= probs.min() and probs.max() <= 1
    # On the search fold the refit continued the finished trial's run instead of training again:
    # it reported the trial's last epoch once, then its OOF (fold 1 trained 3 epochs, then OOF),
    # and its model is the trial's best model.
    reported = {lines[0]["config"]["job"]["fold"]: [r.get("stage") for r in lines]
                for lines in trial_results(root, experiment="refit").values()}
    assert reported == {0: [None, "oof"], 1: [None, None, None, "oof"]}
    trial_state, refit_state = (load_checkpoint(path) for path in (best["checkpoint"], refit.models[0].checkpoint))
    assert all(torch.equal(trial_state["model"][k], refit_state["model"][k]) for k in trial_state["model"])


def trained_epochs(root: Path) -> dict[str, int]:
    """Epochs in each trial's latest *registered* Ray Train checkpoint. A checkpoint folder appears
    before Ray Train records it in checkpoint_manager_snapshot.json; killed in between, the trial
    rightly starts again without it, so the test waits for the record. (The snapshot is replaced
    whole, search/storage.py: a half-written one would be a failure, not something to wait out.)"""
    out = {}
    for run in (root / "train_runs").glob("trial-*"):
        try:
            snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
        except FileNotFoundError:
            continue
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


def interruption(epochs: dict[str, int], kill_at: str, root: Path):
    """(finished trials, interrupted trial) once the search has reached `kill_at`, else None."""
    if kill_at == "mid-trial" and 2 in epochs.values() and 1 in epochs.values():  # one done, the next mid-way
        return {t for t, n in epochs.items() if n == 2}, next(t for t, n in epochs.items() if n == 1)
    if kill_at == "after-last-epoch" and list(epochs.values()).count(2) == 2:
        # The second trial's last checkpoint is recorded, but its Train run is still winding down
        # (workers shut down, result on its way to Tune): restarted, it has nothing left to train.
        snapshot = lambda t: root / "train_runs" / f"trial-{t}" / "checkpoint_manager_snapshot.json"
        last = max(epochs, key=lambda t: snapshot(t).stat().st_mtime)
        return {t for t in epochs if t != last}, last
    return None


@pytest.mark.parametrize("kill_at", ["mid-trial", "after-last-epoch"])
def test_killed_driver_resumes_without_rerunning_finished_trials(train_cache, tmp_path, kill_at):
    config = write_configs(tmp_path, train_cache, "resume", epochs=2, num_samples=3,
                           asha={"enabled": False}, space={"train.lr": {"loguniform": [1e-3, 5e-3]}},
                           refit={"topk": 0})
    root = tmp_path / "storage" / "resume"
    log = open(tmp_path / "first-run.log", "w")
    # Tune saves its experiment state every few seconds by default; at every step here, so that
    # what it saved matches what the test saw when it killed the driver. It also means the kill
    # often lands while that state is being written: before search/storage.py replaced files
    # whole, that left a truncated experiment_state-*.json, and Tune silently started over.
    proc = subprocess.Popen([sys.executable, "-m", "search", "--config", str(config)],
                            env={**ENV, "TUNE_GLOBAL_CHECKPOINT_S": "0"},
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 400
        while time.time() < deadline:
            reached = interruption(trained_epochs(root), kill_at, root)
            if reached:
                finished, interrupted = reached
                break
            assert proc.poll() is None, ("the search ended before it could be interrupted:\n"
                                         + (tmp_path / "first-run.log").read_text()[-3000:])
            time.sleep(0.2)
        else:
            pytest.fail("the search did not reach its second trial in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver dies
        proc.wait()
        log.close()
        # ...and what is left of its local Ray instance goes too. `ray stop` ends every Ray process
        # on the machine: these tests must not run beside other Ray work.
        subprocess.run([RAY, "stop", "--force"], env=ENV, capture_output=True)
    # (the interrupted trial's workers may finish an epoch before `ray stop` reaches them)
    checkpoints = {t: sorted(p.name for p in (root / "train_runs" / f"trial-{t}").glob("checkpoint_*"))
                   for t in finished}
    first_epoch = epoch_lines(root, interrupted)[0]

    again = run_search(config)
    (tmp_path / "second-run.log").write_text(again.stdout + again.stderr)  # kept for a failure's diagnosis
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "search: resuming" in again.stdout
    # The interrupted trial continued from its checkpoint: its final metrics start with the very
    # epoch-1 line written before the kill (a retrained epoch 1 would differ, in its timings at
    # least). Checked on files: the workers' "fit: resuming" line reaches the driver's stdout only
    # through Ray's log forwarding, which does not always deliver it before the driver exits.
    assert epoch_lines(root, interrupted)[:1] == [first_epoch], "the interrupted trial restarted instead of resuming"
    for trial in finished:  # not trained again: no new checkpoint, Tune kept its two results
        run = root / "train_runs" / f"trial-{trial}"
        assert sorted(p.name for p in run.glob("checkpoint_*")) == checkpoints[trial]
        assert [r["epochs_done"] for r in trial_results(root)[trial]] == [1, 2]
    rows = leaderboard(root)
    assert len(rows) == 3 and all(r["status"] == "finished" for r in rows), (
        [{k: r[k] for k in ("trial_id", "status", "epochs_run", "error")} for r in rows],
        f"first run: finished {sorted(finished)}, interrupted {interrupted}",
        {p.parent.name: p.read_text()[-2000:] for p in (root / "tune").glob("*/error.txt")},
        again.stdout[-3000:], again.stderr[-2000:])
    assert all(n == 2 for n in trained_epochs(root).values())
    # Tune's record of the restarted trial starts at its restart; the leaderboard still has the
    # epoch trained before the kill, and ranks the trial by its best epoch of the two.
    row = next(r for r in records.load(SearchRecord, root / SEARCH_RECORD).leaderboard if r.trial_id == interrupted)
    trained = [json.loads(line) for line in epoch_lines(root, interrupted)]
    assert [h["epoch"] for h in row.history] == [1, 2]
    assert row.best_score == max(m["score"] for m in trained)


def test_ray_job_submit_to_a_head_node(train_cache, tmp_path):
    # Ray >= 2.59 requires token authentication on a started cluster: one token for head and client.
    env = {**ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    config = write_configs(tmp_path, train_cache, "job", epochs=1, num_samples=1,
                           space={"train.lr": {"loguniform": [1e-3, 5e-3]}}, refit={"topk": 0})
    start = subprocess.run([RAY, "start", "--head", "--num-cpus", "3", "--port", "6391",
                            "--dashboard-port", "8291", "--include-dashboard", "true", "--disable-usage-stats"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        job = subprocess.run([RAY, "job", "submit", "--address", "http://127.0.0.1:8291", "--",
                              sys.executable, "-m", "search", "--config", str(config)],
                             env=env, capture_output=True, text=True, timeout=400)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
    rows = leaderboard(tmp_path / "storage" / "job")
    assert len(rows) == 1 and rows[0]["status"] == "finished"
