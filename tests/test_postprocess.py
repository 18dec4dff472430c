"""Post-processing and its OOF tuning on constructed probabilities with known answers."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from ensemble.selection.postprocess import (
    THRESHOLDS,
    PostProcess,
    apply,
    empty_sparse_slices,
    remove_small_components,
    scores_with,
    tune,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from naive_tune import tune_naive  # noqa: E402  (the benchmark's baseline, checked against tune)

QUIET = dict(log=lambda *_: None)


def organ_volumes(n=4, depth=12, size=32, seed=0):
    """Ground truth: one box per class in some slices of each volume (others empty)."""
    rng = np.random.default_rng(seed)
    vols = []
    for _ in range(n):
        gt = np.zeros((3, depth, size, size), bool)
        for c in range(3):
            z0 = rng.integers(0, depth // 2)
            y0, x0 = rng.integers(2, size // 2, size=2)
            gt[c, z0:z0 + depth // 3, y0:y0 + 8 + 2 * c, x0:x0 + 9] = True
        vols.append(gt)
    return vols


def test_threshold_search_finds_the_known_optimum():
    # Foreground probabilities lie above a class-specific cut, background below it: only a threshold
    # at the cut separates them (the grid holds 0.3, 0.45 and 0.6 exactly).
    cuts = [0.30, 0.45, 0.60]
    rng = np.random.default_rng(1)
    data = []
    for gt in organ_volumes():
        probs = np.empty(gt.shape, np.float32)
        for c, cut in enumerate(cuts):
            fg = rng.uniform(cut + 0.01, 1.0, gt[c].shape)  # clear of float16 rounding
            bg = rng.uniform(0.0, cut - 0.01, gt[c].shape)
            probs[c] = np.where(gt[c], fg, bg)
        data.append((probs.astype(np.float16), gt))
    post, steps = tune(lambda: iter(data), **QUIET)
    assert post.thresholds == cuts
    assert steps[0]["after"] == pytest.approx(1.0)
    assert steps[0]["before"] < 1.0  # 0.5 is wrong for two of the classes


def test_post_processing_that_hurts_is_rejected():
    # Perfect probabilities whose truth has tiny parts: removing small components or sparse slices
    # would delete true voxels, so both steps must stay off.
    data = []
    for gt in organ_volumes():
        gt = gt.copy()
        gt[:, 0, 0:2, 0:2] = True  # a 4-voxel true component on slice 0
        data.append((gt.astype(np.float32) * 0.9, gt))
    post, steps = tune(lambda: iter(data), **QUIET)
    assert post.min_size == [0, 0, 0] and post.min_pixels == [0, 0, 0]
    assert [s["kept"] for s in steps[1:]] == [False, False]


def test_post_processing_that_helps_is_kept():
    # Spurious specks far from the organs cost Hausdorff; a minimum component size removes them.
    data = []
    for gt in organ_volumes():
        probs = gt.astype(np.float32) * 0.9
        probs[:, -1, -3:, -3:] = 0.8  # a 9-voxel false positive on the last slice
        data.append((probs, gt))
    post, steps = tune(lambda: iter(data), **QUIET)
    assert all(0 < m <= 100 for m in post.min_size)
    assert steps[1]["kept"] and steps[1]["after"] > steps[1]["before"]
    masks = apply(data[0][0], post)
    assert np.array_equal(masks, data[0][1])


def test_a_step_is_kept_only_if_no_class_loses_more_than_the_tolerance():
    # Specks far from the organs in classes 0 and 1 cost Hausdorff; class 2's truth has a real
    # 4-voxel part that a minimum component size would delete. The step removes the specks, keeps
    # class 2 at size 0, and is kept: no class loses (nnU-Net's rule, within CLASS_TOLERANCE).
    data = []
    for gt in organ_volumes():
        gt = gt.copy()
        gt[2, 0, 0:2, 0:2] = True
        probs = gt.astype(np.float32) * 0.9
        probs[:2, -1, -3:, -3:] = 0.8
        data.append((probs, gt))
    post, steps = tune(lambda: iter(data), min_sizes=(0, 10), min_pixels=(0,), **QUIET)
    step = steps[1]
    assert post.min_size == [10, 10, 0] and step["kept"] and step["after"] > step["before"]
    assert all(a >= b for a, b in zip(step["class_after"], step["class_before"]))
    # A tolerance below zero asks every class to gain at least that much: class 2 does not gain, so
    # the same step, though it raises the total, is rejected and every class goes back to off.
    post, steps = tune(lambda: iter(data), min_sizes=(0, 10), min_pixels=(0,), class_tolerance=-1e-6, **QUIET)
    assert post.min_size == [0, 0, 0] and not steps[1]["kept"] and steps[1]["after"] > steps[1]["before"]


def test_fast_search_matches_the_naive_search_and_reuses_masks():
    rng = np.random.default_rng(2)
    data = []
    for gt in organ_volumes(n=3, depth=8, size=24):
        noise = rng.uniform(0, 0.7, gt.shape) * (rng.uniform(size=gt.shape) < 0.05)
        probs = np.clip(gt * rng.uniform(0.35, 1.0, gt.shape) + noise, 0, 1).astype(np.float16)
        data.append((probs, gt))
    grids = dict(thresholds=(0.3, 0.4, 0.5, 0.6), min_sizes=(0, 2, 5, 20), min_pixels=(0, 3, 10))
    post, steps = tune(lambda: iter(data), **grids, **QUIET)
    assert post == tune_naive(lambda: iter(data), **grids)
    assert sum(s["masks_scored"] for s in steps) < sum(s["candidates_evaluated"] for s in steps)


def test_steps_on_a_hand_made_mask():
    mask = np.zeros((3, 10, 10), bool)
    mask[0, :4, :4] = True           # 16 voxels
    mask[1, 8, 8] = True             # 1 voxel, touching nothing
    mask[2, 0:2, 0:2] = True         # 4 voxels, two slices away from the first block
    kept = remove_small_components(mask, 5)
    assert kept[0].sum() == 16 and not kept[1].any() and not kept[2].any()
    sparse = empty_sparse_slices(mask, 5)
    assert sparse[0].sum() == 16 and not sparse[1].any() and not sparse[2].any()
    assert PostProcess.from_dict(PostProcess([0.3, 0.4, 0.5], [1, 2, 3], [0, 0, 9]).to_dict()).min_pixels == [0, 0, 9]
    with pytest.raises(ValueError, match="one value per class"):
        PostProcess.from_dict({"thresholds": [0.5], "min_size": [0, 0, 0], "min_pixels": [0, 0, 0]})


def gated_volumes(n=4, seed=3):
    """Perfect masks plus a false-positive blob on slices where the organ is absent; the gate says
    (correctly) that it is absent there: only the gate can remove those blobs."""
    rng = np.random.default_rng(seed)
    data = []
    for gt in organ_volumes(n=n):
        probs = gt.astype(np.float32) * 0.9
        gate = np.where(gt.any(axis=(2, 3)), rng.uniform(0.6, 1.0, gt.shape[:2]), rng.uniform(0.0, 0.25, gt.shape[:2]))
        for c in range(3):
            empty = np.flatnonzero(~gt[c].any(axis=(1, 2)))
            probs[c, empty[0], 8:28, 8:28] = 0.8  # 400 voxels: larger than any true component or slice
        data.append((probs, gt, gate.astype(np.float32)))
    return data


def test_the_gate_rule_is_tuned_with_a_gate_head_and_off_without():
    data = gated_volumes()
    post, steps = tune(lambda: iter(data), **QUIET)
    assert [s["step"] for s in steps] == ["thresholds", "min_size", "min_pixels", "gate"]
    assert post.min_size == [0] * 3 and post.min_pixels == [0] * 3  # neither rule can remove the blobs
    assert steps[-1]["kept"] and all(0 < t <= 0.6 for t in post.gate)
    assert steps[-1]["after"] == pytest.approx(1.0)
    masks = apply(data[0][0], post, data[0][2])
    assert np.array_equal(masks, data[0][1])
    assert not np.array_equal(apply(data[0][0], post), data[0][1])  # no gate given: the rule is off
    # The same volumes without gate probabilities: today's three steps, the gate off.
    post, steps = tune(lambda: iter([(p, gt) for p, gt, _ in data]), **QUIET)
    assert [s["step"] for s in steps] == ["thresholds", "min_size", "min_pixels"] and post.gate == [0.0] * 3
    assert PostProcess.from_dict({k: v for k, v in post.to_dict().items() if k != "gate"}) == post  # older manifests


def test_fast_search_matches_the_naive_search_with_a_gate():
    rng = np.random.default_rng(4)
    data = []
    for probs, gt, gate in gated_volumes(n=3, seed=5):
        noise = rng.uniform(0, 0.7, gt.shape) * (rng.uniform(size=gt.shape) < 0.05)
        data.append((np.clip(probs + noise, 0, 1).astype(np.float16), gt, np.clip(gate + rng.normal(0, 0.2, gate.shape),
                                                                                   0, 1)))
    grids = dict(thresholds=(0.3, 0.5, 0.7), min_sizes=(0, 5, 20), min_pixels=(0, 10), gate_thresholds=(0, 0.2, 0.4))
    post, steps = tune(lambda: iter(data), **grids, **QUIET)
    assert post == tune_naive(lambda: iter(data), **grids)
    assert steps[-1]["step"] == "gate"


def test_cropped_scoring_equals_the_whole_volume():
    """Tuning scores each class volume on the box of its truth and of every voxel at the lowest
    threshold (at the real size a small part of the scan); the sums equal the whole volume's."""
    from ensemble.selection.postprocess import threshold_sums
    from gitseg.metrics import ScoreSums

    rng = np.random.default_rng(3)
    data = []
    for gt in organ_volumes(n=3, depth=16, size=48):
        probs = np.clip(gt * rng.uniform(0.3, 1.0, gt.shape), 0, 1).astype(np.float32)
        probs[:, 2:4, 30:34, 36:40] = 0.8  # a false positive away from the organs
        data.append((probs, gt))
    for probs, gt in data:
        for c in range(3):
            whole = [np.asarray(ScoreSums.of_volume(probs[c] >= t, gt[c])) for t in THRESHOLDS]
            assert np.allclose(threshold_sums(probs[c], gt[c]), whole, rtol=0, atol=1e-12)
    post, steps = tune(lambda: iter(data), **QUIET)
    last = steps[-1]["after"] if steps[-1]["kept"] else steps[-1]["before"]
    assert scores_with(lambda: iter(data), post)["score"] == pytest.approx(last, abs=1e-12)
