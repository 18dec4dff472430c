"""Out-of-fold storage (gitseg.oof): uint8 steps of 1/255, deflated. Quantising must not move what
the ensemble decides: the tuned post-processing and the OOF score stay within half a step."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ensemble.selection.postprocess import THRESHOLDS, PostProcess, scores_with, threshold_sums, tune
from gitseg.files import save_compressed
from gitseg.oof import dequantise, load_oof, oof_file, quantise, stored_threshold


def volumes(seed: int, n: int = 6, shape=(12, 48, 48)):
    """(probabilities, ground truth) pairs like a trained model's: smooth, mostly near 0 or 1, with
    uncertain borders, a few false-positive blobs, and some slices without the organ."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        gt = np.zeros((3, *shape), bool)
        probs = np.zeros((3, *shape), np.float32)
        for c in range(3):
            field = ndimage.gaussian_filter(rng.normal(size=shape), (1.5, 4, 4))
            gt[c] = field > np.quantile(field, 0.9)
            gt[c, : rng.integers(0, 4)] = False
            noisy = ndimage.gaussian_filter(gt[c].astype(np.float32) + rng.normal(0, 0.6, shape), (0.8, 2, 2))
            probs[c] = 1 / (1 + np.exp(-(noisy - 0.35) * 9))
        out.append((probs, gt))
    return out


def stored(vols, tmp_path, name):
    """The same volumes written as OOF files and read back."""
    folder = tmp_path / name
    folder.mkdir()
    back = []
    for i, (probs, gt) in enumerate(vols):
        save_compressed(oof_file(folder, f"case{i}_day1"), probs=quantise(probs))
        back.append((load_oof(folder, f"case{i}_day1"), gt))
    return back


def test_quantise_rounds_halves_up_and_thresholds_map_exactly():
    probs = np.array([0.0, 0.5 / 255, 0.49 / 255, 1.0, 63.5 / 255 + 1e-6, 0.25])
    assert quantise(probs).tolist() == [0, 1, 0, 255, 64, 64]
    assert np.abs(dequantise(quantise(np.linspace(0, 1, 1001))) - np.linspace(0, 1, 1001)).max() <= 0.5 / 255 + 1e-6
    p = np.random.default_rng(0).random(200_000).astype(np.float32)
    for t in THRESHOLDS:
        assert abs(stored_threshold(t) - t) <= 0.5 / 255 + 1e-12
        assert np.array_equal(dequantise(quantise(p)) >= t, p >= stored_threshold(t)), t


def test_one_model_scores_exactly_as_at_the_stored_thresholds(tmp_path):
    """For one model, the stored probabilities at threshold t give the exact probabilities' score at
    stored_threshold(t) (within half a step of t), class by class and threshold by threshold."""
    exact = volumes(1)
    back = stored(exact, tmp_path, "oof")
    for (p, gt), (q, _) in zip(exact, back):
        for c in range(3):
            shifted = [stored_threshold(t) for t in THRESHOLDS]
            assert np.array_equal(threshold_sums(q[c], gt[c]), threshold_sums(p[c], gt[c], shifted))


@pytest.mark.parametrize("models", [1, 2])
def test_tuning_on_stored_oof_keeps_the_thresholds_and_the_score(tmp_path, models):
    """Tuned on the stored OOF (one model, or the mean of two as the ensemble averages them), the
    post-processing is the same and the OOF score moves by less than a quantisation step's worth."""
    exact = [volumes(seed) for seed in range(2, 2 + models)]
    back = [stored(v, tmp_path, f"m{i}") for i, v in enumerate(exact)]

    def mean(sets):
        return [(sum(s[i][0] for s in sets) / len(sets), sets[0][i][1]) for i in range(len(sets[0]))]

    quiet = dict(log=lambda *a: None)
    post_exact, steps_exact = tune(lambda: mean(exact), **quiet)
    post_stored, steps_stored = tune(lambda: mean(back), **quiet)
    assert post_stored == post_exact
    after = [s["after"] if s["kept"] else s["before"] for s in (steps_exact[-1], steps_stored[-1])]
    assert abs(after[0] - after[1]) < 2e-3
    # For one model the score of the stored OOF is exactly the exact OOF's at the stored thresholds.
    if models == 1:
        shifted = PostProcess(**{**post_exact.to_dict(),
                                 "thresholds": [stored_threshold(t) for t in post_exact.thresholds]})
        assert scores_with(lambda: back[0], post_stored)["score"] == pytest.approx(
            scores_with(lambda: exact[0], shifted)["score"], abs=1e-12)

