"""Distillation without Ray: the teacher folder contract, the student's dataset and its loss."""

import math

import numpy as np
import pytest
from conftest import tiny_config

from gitseg.config import ConfigError
from gitseg.data.cache import Cache, pack_masks, resize_probs
from gitseg.data.dataset import SliceDataset
from gitseg.oof import quantise
from gitseg.teacher import Teacher, write_case_day, write_record
from gitseg.train import fit

QUIET = dict(log=lambda *_: None)


def make_teacher(cache: Cache, folder, value=None, pseudo_from: str | None = None, seed=0):
    """A teacher folder for every non-holdout case-day of `cache` (random probabilities, or `value`
    everywhere); `pseudo_from`: a holdout case-day written as an unlabelled, pseudo-labelled one."""
    rng = np.random.default_rng(seed)
    entries = {}
    for cd in cache.case_days():
        d = cache.entries[cd]["slices"]
        shape = (3, d, cache.size, cache.size)
        probs = np.full(shape, value, np.float32) if value is not None else rng.random(shape, dtype=np.float32)
        write_case_day(folder, cd, probs)
        entries[cd] = {"slices": d, "pseudo": False}
    if pseudo_from:
        d = cache.entries[pseudo_from]["slices"]
        masks = cache.masks(pseudo_from)
        write_case_day(folder, "case999_day0", masks.astype(np.float32), image=np.asarray(cache.image(pseudo_from)),
                       packed_masks=pack_masks(masks))
        entries["case999_day0"] = {"slices": d, "pseudo": True}
    write_record(folder, cache.size, {"made_by": "test"}, entries)
    return Teacher(folder)


def test_the_dataset_gives_labels_then_teacher_probabilities_and_adds_pseudo_labelled_days(train_cache, tmp_path):
    cache = Cache(train_cache)
    holdout = cache.case_days(holdout=True)[0]
    teacher = make_teacher(cache, tmp_path / "teacher", pseudo_from=holdout)
    days = cache.case_days(folds=[1])
    plain = SliceDataset(cache, days, 3, 1)
    ds = SliceDataset(cache, days, 3, 1, teacher=teacher)
    assert len(ds) == len(plain) + cache.entries[holdout]["slices"]
    for i in (0, 7, len(plain) - 1):
        image, targets = ds[i]
        cd, z = ds.items[i]
        assert targets.shape == (6, cache.size, cache.size)
        assert np.array_equal(image.numpy(), plain[i][0].numpy())
        assert np.array_equal(targets[:3].numpy(), plain[i][1].numpy())
        assert np.allclose(targets[3:].numpy(), teacher.probs(cd, z) / 255.0)
    image, targets = ds[len(ds) - 1]  # the pseudo-labelled day's last slice: its own image and pseudo-labels
    z = cache.entries[holdout]["slices"] - 1
    assert np.array_equal(image[1].numpy(), np.asarray(cache.image(holdout)[z], np.float32))
    assert np.array_equal(targets[:3].numpy(), cache.masks(holdout, z).astype(np.float32))


def test_augmentation_moves_teacher_probabilities_with_the_labels(train_cache, tmp_path):
    from gitseg.data.dataset import build_augment

    cache = Cache(train_cache)
    days = cache.case_days(folds=[1])
    # The teacher's probabilities are the labels: any transform must keep them equal.
    entries = {}
    for cd in cache.case_days():
        write_case_day(tmp_path / "t", cd, cache.masks(cd).astype(np.float32))
        entries[cd] = {"slices": cache.entries[cd]["slices"], "pseudo": False}
    write_record(tmp_path / "t", cache.size, {}, entries)
    ds = SliceDataset(cache, days, 3, 1, augment=build_augment(2.0), teacher=Teacher(tmp_path / "t"))
    ds.augment.set_random_seed(0)
    moved = 0
    for i in range(0, len(ds), 9):
        _, targets = ds[i]
        assert np.array_equal(targets[:3].numpy(), targets[3:].numpy())
        moved += not np.array_equal(targets[:3].numpy(), cache.masks(*ds.items[i]).astype(np.float32))
    assert moved > 0  # the transform did move the masks


def test_a_teacher_for_another_cache_is_refused(train_cache, tmp_path):
    cache = Cache(train_cache)
    teacher = make_teacher(cache, tmp_path / "teacher", value=0.5)
    missing = cache.case_days(folds=[0])[0]
    del teacher.entries[missing]
    with pytest.raises(ValueError, match=f"no targets for 1 training case-day.*{missing}"):
        SliceDataset(cache, cache.case_days(), 3, 1, teacher=teacher)
    teacher = make_teacher(cache, tmp_path / "teacher", value=0.5)
    teacher.size = 32
    with pytest.raises(ValueError, match="at 32 px but the cache is at 64 px"):
        SliceDataset(cache, cache.case_days(), 3, 1, teacher=teacher)
    with pytest.raises(FileNotFoundError, match="not a complete teacher folder"):
        Teacher(tmp_path)


def test_teacher_weight_one_trains_toward_the_teacher(train_cache, tmp_path):
    """Probabilities of 0.5 everywhere: the soft BCE cannot go below ln 2, whatever the network does,
    so with teacher_weight 1 every batch's loss is at least ln 2; on the labels alone it is far lower."""
    make_teacher(Cache(train_cache), tmp_path / "teacher", value=0.5)
    cfg = tiny_config(train_cache, tmp_path / "soft", teacher_weight=1.0)
    cfg.data.teacher = str(tmp_path / "teacher")
    soft = fit(cfg, **QUIET)
    assert soft["train_loss"] >= math.log(2) - 1e-4
    labels = fit(tiny_config(train_cache, tmp_path / "labels"), **QUIET)
    assert labels["train_loss"] < math.log(2) - 0.05
    half = tiny_config(train_cache, tmp_path / "half", teacher_weight=0.5)
    half.data.teacher = str(tmp_path / "teacher")
    mixed = fit(half, **QUIET)
    assert labels["train_loss"] < mixed["train_loss"] < soft["train_loss"]


@pytest.mark.parametrize("override,message", [("train.teacher_weight=1.5", "teacher_weight must be in"),
                                              ("data.teacher=/nonexistent/teacher", "is not a folder")])
def test_bad_teacher_settings(train_cache, tmp_path, override, message):
    key, value = override.split("=")
    cfg = tiny_config(train_cache, tmp_path / "run")
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, float(value) if section == "train" else value)
    with pytest.raises(ConfigError, match=message):
        fit(cfg, **QUIET)


def test_quantise_and_resize_keep_probabilities():
    probs = np.linspace(0, 1, 3 * 2 * 40 * 30, dtype=np.float32).reshape(3, 2, 40, 30)
    assert np.abs(quantise(probs) / 255.0 - probs).max() <= 0.5 / 255 + 1e-7
    small = resize_probs(probs, 16)
    assert small.shape == (3, 2, 16, 16) and 0 <= small.min() and small.max() <= 1
    assert np.allclose(resize_probs(np.full((3, 1, 40, 30), 0.3, np.float32), 64), 0.3)
