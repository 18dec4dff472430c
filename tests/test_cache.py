"""prepare: round trip, idempotence, crash safety, bad files, folds; the 2.5D datasets."""

import json
import os
import subprocess
import sys

import albumentations as A
import numpy as np
import pytest

from gitseg.data import cache as cache_mod
from gitseg.data.cache import Cache, assign_splits, prepare, resize_masks
from gitseg.data.dataset import SliceDataset, VolumeDataset, build_augment, window_indices
from gitseg.data.uwmgi import DataFormatError, index_root, load_volume
from gitseg.files import CorruptFileError, FolderInUse, folder_lock, lock_file

QUIET = dict(log=lambda *_: None)


def test_masks_survive_exactly(synth_root, cache_dir):
    cache = Cache(cache_dir)
    slices, _ = index_root(synth_root)
    assert set(cache.entries) == set(slices["case_day"])
    for case_day in list(cache.entries)[:4]:
        vol = load_volume(synth_root, case_day)
        entry = cache.entries[case_day]
        assert (entry["slices"], entry["height"], entry["width"]) == vol.image.shape
        assert np.array_equal(cache.original_masks(case_day), vol.masks)
        assert np.array_equal(cache.masks(case_day), resize_masks(vol.masks, (48, 48)))
        image = cache.image(case_day)
        assert image.shape == (vol.image.shape[0], 48, 48) and image.dtype == np.float16
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0


def test_normalisation_removes_the_gain(synth_root, cache_dir):
    cache = Cache(cache_dir)
    raw_max, norm_p99 = [], []
    for case_day in cache.entries:
        raw_max.append(load_volume(synth_root, case_day).image.max())
        norm_p99.append(np.percentile(np.asarray(cache.image(case_day), np.float32), 99))
    assert max(raw_max) / min(raw_max) > 3
    assert max(norm_p99) - min(norm_p99) < 0.3


def test_rerun_does_no_work_and_changes_are_rebuilt(synth_copy, tmp_path):
    out = tmp_path / "c"
    lines = []
    prepare(synth_copy, out, size=32, folds=2, holdout=0.2, log=lines.append)
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "volumes").iterdir()}
    prepare(synth_copy, out, size=32, folds=2, holdout=0.2, log=lines.append)
    assert "0 to build" in lines[-1]
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (out / "volumes").iterdir()}
    # touching one PNG rebuilds exactly that case-day
    png = sorted((synth_copy / "train").rglob("*.png"))[0]
    png.write_bytes(png.read_bytes())
    prepare(synth_copy, out, size=32, folds=2, holdout=0.2, log=lines.append)
    assert "1 to build" in lines[-1]


def test_crash_midway_leaves_nothing_trusted(synth_root, tmp_path, monkeypatch):
    out = tmp_path / "c"
    calls = {"n": 0}
    real = cache_mod._build_entry

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real(*args)

    monkeypatch.setattr(cache_mod, "_build_entry", flaky)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare(synth_root, out, size=32, folds=2, workers=1, **QUIET)
    assert not (out / "manifest.json").exists()
    assert not list((out / "volumes").glob("*.json"))
    assert not list(out.glob(".staging-*"))
    monkeypatch.setattr(cache_mod, "_build_entry", real)
    manifest = prepare(synth_root, out, size=32, folds=2, workers=1, **QUIET)
    assert len(manifest["entries"]) == 10


PREPARE = """
import sys
from gitseg.cli import main
sys.exit(main(["prepare", "--data", sys.argv[1], "--out", sys.argv[2], "--size", "32", "--folds", "2"]))
"""


def test_a_second_prepare_into_one_cache_refuses_and_the_cache_is_valid(synth_root, tmp_path):
    """Two `gitseg prepare` runs into one cache at once: the second to take the lock refuses with a
    message naming the first (instead of deleting its staging folder), and the cache is complete."""
    out = tmp_path / "c"
    with folder_lock(out, "gitseg prepare"):  # a first run, mid-way: its staging folder is there
        staging = out / ".staging-first"
        staging.mkdir(parents=True)
        with pytest.raises(FolderInUse, match=f"in use by gitseg prepare \\(pid {os.getpid()}"):
            prepare(synth_root, out, size=32, folds=2, **QUIET)
        assert staging.is_dir()
        staging.rmdir()
    # Two real processes started together: each one either prepares or refuses, and the cache is valid.
    runs = [subprocess.Popen([sys.executable, "-c", PREPARE, str(synth_root), str(out)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(timeout=120), run.stderr.read()) for run in runs]
    assert all(code == 0 or (code == 2 and "c is in use by " in err) for code, err in results), results
    assert any(code == 0 for code, _ in results)
    cache = Cache(out)
    assert len(cache.entries) == 10 and not list(out.glob(".staging-*")) and not lock_file(out).exists()


def test_a_truncated_cache_volume_is_named_and_rebuilt(synth_root, tmp_path):
    out = tmp_path / "c"
    prepare(synth_root, out, size=32, folds=2, **QUIET)
    cache = Cache(out)
    case_day = cache.case_days()[0]
    image = out / "volumes" / cache.entries[case_day]["files"]["image"]
    image.write_bytes(image.read_bytes()[:-100])
    with pytest.raises(CorruptFileError, match=rf"{image.name} is truncated or altered .*run `gitseg prepare` again"):
        Cache(out).image(case_day)
    lines = []
    prepare(synth_root, out, size=32, folds=2, log=lines.append)
    assert "9 cached, 1 to build" in lines[0]
    assert Cache(out).image(case_day).shape == (40, 32, 32)


def damage_one_png(root):
    png = sorted((root / "train").rglob("*.png"))[7]
    png.write_bytes(b"\x89PNG garbage")
    return png


def test_bad_files_stop_before_writing(synth_copy, tmp_path):
    png = damage_one_png(synth_copy)
    bad_name = png.parent / "slice_x.png"
    bad_name.write_bytes(b"")
    out = tmp_path / "c"
    with pytest.raises(DataFormatError) as err:
        prepare(synth_copy, out, size=32, folds=2, **QUIET)
    assert "slice_x.png" in str(err.value) and "--skip-bad" in str(err.value)
    assert not out.exists()
    bad_name.unlink()  # now only the corrupt PNG, found while decoding
    with pytest.raises(DataFormatError) as err:
        prepare(synth_copy, out, size=32, folds=2, **QUIET)
    assert png.name in str(err.value) and "Nothing was written" in str(err.value)
    assert not (out / "manifest.json").exists() and not list((out / "volumes").iterdir())


def test_bad_files_skipped_when_asked(synth_copy, tmp_path):
    png = damage_one_png(synth_copy)
    lines = []
    manifest = prepare(synth_copy, tmp_path / "c", size=32, folds=2, skip_bad=True, log=lines.append)
    bad_case_day = png.parent.parent.name
    assert list(manifest["skipped"]) == [bad_case_day]
    assert bad_case_day not in {e["case_day"] for e in manifest["entries"]}
    assert len(manifest["entries"]) == 9 and bad_case_day in lines[-1]


def test_folds_group_by_case_and_holdout_is_separate(cache_dir):
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    split_of_case = {}
    for e in manifest["entries"]:
        split = "holdout" if e["holdout"] else e["fold"]
        assert split_of_case.setdefault(e["case"], split) == split, "a case is in two splits"
    assert "holdout" in split_of_case.values()
    assert {0, 1} <= set(split_of_case.values())
    cache = Cache(cache_dir)
    train, hold = set(cache.case_days()), set(cache.case_days(holdout=True))
    assert train and hold and not train & hold


def test_assign_splits_is_balanced_and_deterministic():
    rng = np.random.default_rng(0)
    content = {case: rng.uniform(0, 0.5, 3) for case in range(40)}
    a = assign_splits(content, folds=5, holdout=0.15, seed=1)
    assert a == assign_splits(content, folds=5, holdout=0.15, seed=1)
    assert sum(v is None for v in a.values()) == 6
    sizes = np.bincount([v for v in a.values() if v is not None])
    assert sizes.max() - sizes.min() <= 1
    totals = np.array([sum(content[c] for c, f in a.items() if f == k) for k in range(5)])
    assert (totals.std(axis=0) / totals.mean(axis=0)).max() < 0.1
    with pytest.raises(ValueError, match="cannot make 5 folds"):
        assign_splits({1: np.ones(3), 2: np.ones(3)}, folds=5, holdout=0.0, seed=0)


def test_missing_cache_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="gitseg prepare"):
        Cache(tmp_path)


# --- 2.5D datasets ----------------------------------------------------------------------------

def test_window_indices_clamp_at_the_ends():
    w = window_indices(6, channels=5, stride=2)
    assert w.shape == (6, 5)
    assert w[0].tolist() == [0, 0, 0, 2, 4]
    assert w[3].tolist() == [0, 1, 3, 5, 5]
    assert w[5].tolist() == [1, 3, 5, 5, 5]
    with pytest.raises(ValueError, match="odd"):
        window_indices(6, 4, 1)
    with pytest.raises(ValueError, match="stride"):
        window_indices(6, 3, 0)


def test_slice_dataset_serves_2p5d_samples(cache_dir):
    cache = Cache(cache_dir)
    case_days = cache.case_days(folds=[0])
    ds = SliceDataset(cache, case_days, channels=3, stride=2)
    assert len(ds) == sum(cache.entries[cd]["slices"] for cd in case_days)
    image, masks = ds[10]
    volume = np.asarray(cache.image(case_days[0]), np.float32)
    assert image.shape == (3, 48, 48) and masks.shape == (3, 48, 48)
    assert np.array_equal(image.numpy(), volume[[8, 10, 12]])
    assert np.array_equal(masks.numpy().astype(bool), cache.masks(case_days[0])[:, 10])


def test_augmentation_is_identical_on_channels_and_masks(cache_dir):
    cache = Cache(cache_dir)
    case_days = cache.case_days(folds=[0])
    plain = SliceDataset(cache, case_days, channels=5, stride=1)
    flipped = SliceDataset(cache, case_days, channels=5, stride=1, augment=A.Compose([A.HorizontalFlip(p=1)]))
    index = next(i for i in range(len(plain)) if plain[i][1].sum() > 0)
    (x0, y0), (x1, y1) = plain[index], flipped[index]
    assert np.array_equal(x1.numpy(), x0.numpy()[:, :, ::-1])
    assert np.array_equal(y1.numpy(), y0.numpy()[:, :, ::-1])
    strong = SliceDataset(cache, case_days, channels=5, stride=1, augment=build_augment(1.0))
    x2, y2 = strong[index]
    assert x2.shape == (5, 48, 48) and y2.shape == (3, 48, 48) and set(np.unique(y2.numpy())) <= {0.0, 1.0}
    assert build_augment(0) is None


def test_volume_dataset_yields_whole_volumes_in_order(cache_dir):
    cache = Cache(cache_dir)
    ds = VolumeDataset(cache, cache.case_days(holdout=True), channels=3, stride=1)
    case_day, image, masks = ds[0]
    d = cache.entries[case_day]["slices"]
    assert image.shape == (d, 3, 48, 48) and masks.shape == (3, d, 48, 48)
    volume = np.asarray(cache.image(case_day), np.float32)
    assert np.array_equal(image[:, 1], volume) and np.array_equal(image[1:, 0], volume[:-1])
