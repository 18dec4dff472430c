"""Shared fixtures: one tiny synthetic UWMGI tree and its cache per test session."""

from __future__ import annotations

import shutil

import pytest

from gitseg.data.cache import prepare
from gitseg.data.synth import write_dataset

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
