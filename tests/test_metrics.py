import math

import numpy as np
import pytest
from scipy.spatial.distance import directed_hausdorff

from gitseg.metrics import (
    assd_mm,
    competition_score,
    dice_3d,
    dice_counts,
    dice_from_counts,
    dice_per_slice,
    hausdorff_3d,
    hd95_mm,
)


def brute_force_hausdorff(pred, gt, variant):
    """The reference: scipy's directed_hausdorff over every foreground voxel coordinate."""
    shape = np.array(pred.shape, dtype=float)
    if variant == "kaggle":
        a, b = np.argwhere(pred) / shape, np.argwhere(gt) / shape
        return max(directed_hausdorff(a, b)[0], directed_hausdorff(b, a)[0]) / math.sqrt(3)
    d = directed_hausdorff(np.argwhere(pred).astype(float), np.argwhere(gt).astype(float))[0]
    return min(d / math.sqrt((shape**2).sum()), 1.0)


def box(shape, z, y, x):
    m = np.zeros(shape, bool)
    m[z[0]:z[1], y[0]:y[1], x[0]:x[1]] = True
    return m


# --- Dice ---------------------------------------------------------------------------------------

def test_dice_per_slice_hand_case():
    gt = np.zeros((3, 4, 4), bool)
    pred = np.zeros((3, 4, 4), bool)
    gt[0, :2, :2] = True          # slice 0: 4 gt px, 2 predicted inside -> 2*2/(2+4)
    pred[0, 0, :2] = True
    pred[1, 0, 0] = True          # slice 1: prediction only -> 0
    # slice 2: both empty -> NaN (skipped)
    d = dice_per_slice(pred, gt)
    assert d[0] == pytest.approx(2 * 2 / 6)
    assert d[1] == 0.0
    assert math.isnan(d[2])


def test_dice_counts_sum_before_dividing():
    rng = np.random.default_rng(0)
    pred, gt = rng.random((2, 5, 8, 8)) < 0.3
    counts = dice_counts(pred, gt)
    assert dice_3d(pred, gt) == pytest.approx(dice_from_counts(counts.sum(axis=0)))
    assert dice_3d(np.zeros((2, 2, 2), bool), np.zeros((2, 2, 2), bool)) != dice_3d(pred, gt)


# --- Hausdorff ----------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["kaggle", "diagonal"])
def test_hausdorff_empty_rules(variant):
    empty = np.zeros((4, 5, 6), bool)
    full = box((4, 5, 6), (1, 2), (1, 3), (2, 4))
    assert math.isnan(hausdorff_3d(empty, empty, variant))
    assert hausdorff_3d(full, empty, variant) == 1.0
    assert hausdorff_3d(empty, full, variant) == 1.0
    assert hausdorff_3d(full, full, variant) == 0.0


def test_shifted_box_known_distance():
    shape = (10, 20, 30)
    gt = box(shape, (2, 6), (5, 10), (5, 10))
    pred = box(shape, (2, 6), (5, 10), (8, 13))  # shifted 3 columns
    assert hausdorff_3d(pred, gt, "kaggle") == pytest.approx((3 / 30) / math.sqrt(3), abs=1e-12)
    assert hausdorff_3d(pred, gt, "diagonal") == pytest.approx(3 / math.sqrt(10**2 + 20**2 + 30**2), abs=1e-12)


def test_kaggle_is_symmetric_diagonal_is_directed():
    shape = (8, 16, 16)
    gt = box(shape, (2, 6), (4, 12), (4, 12))
    pred = box(shape, (3, 5), (6, 10), (6, 10))  # inside gt: pred->gt is 0, gt->pred is not
    assert hausdorff_3d(pred, gt, "diagonal") == 0.0
    assert hausdorff_3d(pred, gt, "kaggle") > 0.0
    assert hausdorff_3d(pred, gt, "kaggle") == hausdorff_3d(gt, pred, "kaggle")


def test_interior_voxel_can_be_the_farthest():
    # A ring of ground truth around a filled prediction disc: the prediction's centre, not its
    # surface, is farthest from the ground truth. Surface-only shortcuts get this wrong.
    shape = (3, 41, 41)
    z, y, x = np.ogrid[:3, :41, :41]
    r = np.sqrt((y - 20.0) ** 2 + (x - 20.0) ** 2)
    gt = np.broadcast_to((r >= 15) & (r < 17), shape).copy()
    pred = np.broadcast_to(r < 14, shape).copy()
    for variant in ("kaggle", "diagonal"):
        assert hausdorff_3d(pred, gt, variant) == pytest.approx(brute_force_hausdorff(pred, gt, variant), abs=1e-9)


def random_shapes(rng, shape):
    """A union of random boxes and spheres, some disconnected, some with holes carved out."""
    mask = np.zeros(shape, bool)
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    for _ in range(rng.integers(1, 4)):
        c = rng.uniform(0, 1, 3) * shape
        r = rng.uniform(1, max(2, min(shape) / 2))
        mask |= ((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) < r**2
    if rng.random() < 0.5:  # non-convex: carve a slab
        a = rng.integers(0, shape[2])
        mask[:, :, a:a + 2] = False
    mask |= rng.random(shape) < 0.002  # scattered single voxels
    return mask


@pytest.mark.parametrize("seed", range(25))
def test_matches_brute_force_reference(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in rng.integers([4, 8, 8], [24, 48, 48]))
    pred, gt = random_shapes(rng, shape), random_shapes(rng, shape)
    if not pred.any() or not gt.any():
        pytest.skip("degenerate draw")
    for variant in ("kaggle", "diagonal"):
        assert hausdorff_3d(pred, gt, variant) == pytest.approx(brute_force_hausdorff(pred, gt, variant), abs=1e-9)


def test_rejects_bad_input():
    a = np.zeros((2, 3, 3), bool)
    with pytest.raises(ValueError, match="differs"):
        hausdorff_3d(a, np.zeros((2, 3, 4), bool))
    with pytest.raises(ValueError, match="variant"):
        hausdorff_3d(a, a, "mm")


# --- Clinical distances -------------------------------------------------------------------------

def test_hd95_and_assd_in_mm():
    shape = (5, 10, 10)
    gt = box(shape, (2, 3), (4, 5), (2, 3))
    pred = box(shape, (2, 3), (4, 5), (5, 6))  # 3 columns away; column spacing 2 mm
    assert hd95_mm(pred, gt, (3.0, 1.5, 2.0)) == pytest.approx(6.0)
    assert assd_mm(pred, gt, (3.0, 1.5, 2.0)) == pytest.approx(6.0)
    above = box(shape, (4, 5), (4, 5), (2, 3))  # 2 slices away; slice thickness 3 mm
    assert hd95_mm(above, gt, (3.0, 1.5, 2.0)) == pytest.approx(6.0)
    assert hd95_mm(gt, gt, (3.0, 1.5, 1.5)) == 0.0
    assert math.isnan(hd95_mm(np.zeros(shape, bool), np.zeros(shape, bool), (3, 1, 1)))
    assert math.isinf(assd_mm(gt, np.zeros(shape, bool), (3, 1, 1)))


# --- The competition score ----------------------------------------------------------------------

def test_competition_score_hand_computed():
    shape = (2, 4, 4)
    gt_a = box(shape, (0, 1), (0, 2), (0, 2))   # 4 px on slice 0
    pred_a = box(shape, (0, 1), (0, 2), (0, 1))  # 2 px inside it: dice 2*2/6
    gt_b = np.zeros(shape, bool)                 # empty organ, prediction has one voxel
    pred_b = box(shape, (1, 2), (3, 4), (3, 4))
    gt_c = np.zeros(shape, bool)                 # both empty everywhere: all rows skipped
    preds = {("c1_d1", "large_bowel"): pred_a, ("c1_d1", "small_bowel"): pred_b, ("c1_d1", "stomach"): gt_c}
    gts = {("c1_d1", "large_bowel"): gt_a, ("c1_d1", "small_bowel"): gt_b, ("c1_d1", "stomach"): gt_c}
    out = competition_score(preds, gts)
    # Dice rows: large_bowel slice 0 (2/3), small_bowel slice 1 (0); other rows both empty.
    assert out["dice"] == pytest.approx((2 / 3 + 0) / 2)
    hd_a = (1 / 4) / math.sqrt(3)  # gt pixel (0,1,1) is one column from the prediction
    assert out["hausdorff"] == pytest.approx((hd_a + 1.0) / 2)
    assert out["score"] == pytest.approx(0.4 * out["dice"] + 0.6 * (1 - out["hausdorff"]))
    assert out["score/stomach"] == 1.0  # nothing to find and nothing predicted
    assert out["dice/small_bowel"] == 0.0 and out["hausdorff/small_bowel"] == 1.0


def test_competition_score_needs_matching_keys():
    a = np.zeros((1, 2, 2), bool)
    with pytest.raises(ValueError, match="keys differ"):
        competition_score({("x", "stomach"): a}, {("y", "stomach"): a})


def test_perfect_prediction_scores_one():
    rng = np.random.default_rng(1)
    gts = {(f"case{i}_day0", c): rng.random((4, 8, 8)) < 0.2 for i in range(2) for c in ("large_bowel", "stomach")}
    assert competition_score(gts, gts)["score"] == 1.0


def test_truth_scorer_equals_of_volume_for_every_mask():
    """TruthScorer keeps distances between masks and bounds the truth-to-mask queries: every mask,
    nested or not, empty or not, cropped or not, gets exactly what ScoreSums.of_volume gives."""
    from scipy import ndimage

    from gitseg.metrics import ScoreSums, TruthScorer

    rng = np.random.default_rng(7)
    for trial in range(6):
        gt = ndimage.gaussian_filter(rng.normal(size=(10, 40, 36)), 2) > 0.15
        if trial == 5:
            gt[:] = False
        prob = ndimage.gaussian_filter(gt.astype(float) + rng.normal(0, 0.5, gt.shape), 1.2)
        masks = [prob >= t for t in (0.05, 0.2, 0.35, 0.5, 0.8)]
        masks += [ndimage.binary_dilation(gt, iterations=2), np.zeros_like(gt), rng.random(gt.shape) < 0.01]
        scorer = TruthScorer(gt)
        for mask in masks:
            assert np.allclose(scorer.sums(mask), ScoreSums.of_volume(mask, gt), rtol=0, atol=1e-12)
        # A crop holding every True voxel, with the whole shape: the same sums.
        box = (slice(1, 9), slice(2, 39), slice(0, 36))
        full = np.zeros_like(gt)
        full[box] = gt[box]
        cropped = TruthScorer(full[box], shape=full.shape)
        for mask in masks:
            inside = np.zeros_like(mask)
            inside[box] = mask[box]
            assert np.allclose(cropped.sums(inside[box]), ScoreSums.of_volume(inside, full), rtol=0, atol=1e-12)
