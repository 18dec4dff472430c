"""Shared fixtures: one tiny synthetic UWMGI tree and its cache per test session, and one small
demo run on real local Ray whose search, refit, ensemble and report the slow tests read."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gitseg import infer
from gitseg.data.cache import prepare
from gitseg.data.synth import write_dataset

# Ray Train's controller polls its workers every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), and a Train
# run waits for polls to see its workers start, report and finish: a lone 2-worker TorchTrainer took
# 11.2 s at 0.25 s against 18.6 s at 2 s here (BENCHMARKS.md, the test suite's time; the whole suite's
# spread hides most of it). Set before any process here starts Ray, so the local instances of the
# tests and their subprocesses inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# Each Train run also starts a PreemptionWatcher actor (a process) that polls Ray Core for nodes being
# drained, as spot instances are: a local instance never drains. Off, a lone 2-worker TorchTrainer
# took 13.7 s against 15.1 s with it (same run; BENCHMARKS.md, the test suite's time). gitseg's own
# preemption path (SIGTERM, gitseg/train.py) does not use it and is tested as before.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

# Every `gitseg ensemble` (and distill's holdout table) times each fold model: a warm-up, then the
# median of TIMING_REPEATS runs. The tests need a measured time, not a precise one (none asserts a
# duration): one run each (test_ensemble.py: 73 s against 92 s with 3). Here and in the small demo's
# driver below; Train workers time their trial's model as users' do.
infer.TIMING_REPEATS = 1

TINY = dict(cases=5, days=2, slices=40, size=64, seed=3, test_cases=1)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A read-only tiny data set: 10 labelled case-days of 40 slices, longer side 64 px."""
    root = tmp_path_factory.mktemp("synth") / "uwmgi"
    write_dataset(root, **TINY)
    return root


@pytest.fixture(scope="session")
def cache_dir(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "cache"
    prepare(synth_root, out, size=48, folds=2, holdout=0.2, seed=0, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def train_cache(synth_root, tmp_path_factory):
    """The tiny data set prepared at 64 px (a multiple of 32, as the networks need)."""
    out = tmp_path_factory.mktemp("cache64") / "cache"
    prepare(synth_root, out, size=64, folds=2, holdout=0.2, seed=0, log=lambda *_: None)
    return out


def tiny_config(cache, out, **train):
    """A fast training config: tiny timm test encoder, few steps."""
    from gitseg.config import load_config

    overrides = [f"data.cache={cache}", f"out={out}", "model.encoder=tu-test_resnet", "data.augment=0.5",
                 "train.epochs=1", "train.batch_size=8", "train.max_steps_per_epoch=6", "train.lr=0.003"]
    overrides += [f"train.{k}={v}" for k, v in train.items()]
    return load_config(None, overrides)


@pytest.fixture
def synth_copy(synth_root, tmp_path):
    """A private copy of the tiny data set that a test may damage."""
    root = tmp_path / "uwmgi"
    shutil.copytree(synth_root, root)
    return root


# --- Ray runs -------------------------------------------------------------------------------------

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


# `gitseg demo` as a user runs it, on a smaller embedded data set (4 cases x 2 days of 24 slices, 2
# folds) and with a search that shows every outcome: the base configuration (learns, finishes),
# lr 1e30 (diverges: the trial fails), lr 1e-7 (learns nothing: ASHA stops it at a rung). The search
# is multi-objective (score and latency) and the refit takes the front's best.
#
# Two trials at a time (5 logical CPUs: 2 x (2 workers + a driver's 0.01)), as on a cluster: the
# failing trial runs beside the base one, and the refit's two fold runs side by side, which saves
# about 20 s of start-ups. lr 1e-7 starts when the failed trial's slot frees, more than a Train
# run's start-up after the base trial, which has then reported its first epoch: ASHA compares it
# with that at its first rung (were it first there, it would be stopped at the next).
DEMO_SCRIPT = """
import sys
import gitseg.demo
import gitseg.infer
from gitseg.cli import main
gitseg.demo.DATA = dict(cases=4, days=2, slices=24, size=64, seed=0, test_cases=1)
gitseg.demo.FOLDS = 2
gitseg.infer.TIMING_REPEATS = 1
sys.exit(main(["demo", "--out", {out!r}, "--config", {config!r}]))
"""


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory):
    """(demo folder, terminal stdout, terminal stderr) of one small `gitseg demo` on local Ray: the
    slow tests that only read a search, its refit, ensemble or report share it."""
    tmp = tmp_path_factory.mktemp("demo")
    config = write_configs(tmp, tmp / "set-by-the-demo", "demo", epochs=3, num_samples=3,
                           points=[{"train.lr": 1e30}, {"train.lr": 1e-7}], objectives=["score", "latency"],
                           num_cpus=5, max_concurrent_trials=2,
                           refit={"topk": 1, "select": "pareto"},
                           budget={"trial_epochs": 100},  # not binding: the Tune objects run, nothing stops
                           tracking={"mlflow": True})  # tests/test_tracking.py reads the MLflow store
    out = tmp / "demo"
    subprocess.run([RAY, "stop", "--force"], capture_output=True, env=ENV)
    done = subprocess.run([sys.executable, "-c", DEMO_SCRIPT.format(out=str(out), config=str(config))], env=ENV,
                          capture_output=True, text=True, timeout=900)
    log = out / "demo.log"
    assert done.returncode == 0, (done.stdout[-4000:] + done.stderr[-4000:]
                                  + (log.read_text()[-6000:] if log.is_file() else ""))
    return out, done.stdout, done.stderr
