"""The review list's arithmetic (ensemble/predict/review.py): vote counts give the members' pooled
pairwise Dice exactly, the AUROC is Mann-Whitney's, and the error share ranks slices as said. The
engines' votes, predict's tables and the holdout figures are tested on real ensembles in
test_ensemble.py and test_onnx.py."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from ensemble.predict.review import (
    Votes,
    auroc,
    case_day_review,
    pooled_agreement,
    review_scores,
    review_text,
    slice_rows,
    top_slices,
)


def pairwise_pooled_dice(masks: np.ndarray) -> float:
    """The definition: sum over member pairs of 2|A_i & A_j| over the sum of |A_i| + |A_j|."""
    num = den = 0
    for a, b in itertools.combinations(masks, 2):
        num += 2 * int((a & b).sum())
        den += int(a.sum() + b.sum())
    return num / den if den else 1.0


@pytest.mark.parametrize("members", [2, 3, 5])
def test_counts_give_the_pooled_pairwise_dice_of_the_members(members):
    rng = np.random.default_rng(members)
    masks = rng.random((members, 3, 4, 9, 7)) < rng.uniform(0.05, 0.6, size=(members, 3, 1, 1, 1))
    votes = Votes([0.5, 0.5, 0.5], masks.shape[2:])
    for m in masks:  # as the engines add them, batch by batch of slices
        votes.add(0, m[:, :2])
        votes.add(2, m[:, 2:])
    votes.members = members
    assert np.array_equal(votes.counts, masks.sum(axis=0))
    organ = pooled_agreement(votes.counts, members, axis=(1, 2, 3))
    per_slice = pooled_agreement(votes.counts, members, axis=(2, 3))
    for c in range(3):
        assert organ[c] == pytest.approx(pairwise_pooled_dice(masks[:, c]))
        for z in range(4):
            assert per_slice[c, z] == pytest.approx(pairwise_pooled_dice(masks[:, c, z]))


def test_agreement_at_its_limits_and_a_lone_member_has_none():
    same = np.zeros((3, 2, 4, 4), np.uint8)
    same[0, :, :2] = 3  # all three members mark the same voxels
    assert pooled_agreement(same, 3, axis=(1, 2, 3)).tolist() == [1.0, 1.0, 1.0]  # organs 1, 2: nobody marks
    apart = np.zeros((3, 1, 1, 4), np.uint8)
    apart[:, 0, 0, :2] = 1  # two members, no voxel in common
    assert pooled_agreement(apart, 2, axis=(1, 2, 3)).tolist() == [0.0, 0.0, 0.0]
    assert math.isnan(case_day_review(same, 1, (3.0, 1.5, 1.5))["disagreement"])


def test_case_day_review_disputed_areas_rows_and_text():
    counts = np.zeros((3, 3, 4, 4), np.uint8)
    counts[1, 1, :2, :2] = [[1, 2], [2, 2]]  # small bowel, slice 2: one pixel marked by one member of 2
    counts[2, 2, :, :] = 2  # stomach, slice 3: both agree
    review = case_day_review(counts, 2, (3.0, 1.5, 2.0))
    assert review["slice_disputed_mm2"] == [0.0, 3.0, 0.0]  # one pixel of 1.5 x 2 mm
    assert review["agreement"]["small_bowel"] == pytest.approx(2 * 3 / (3 + 4))
    assert review["disagreement"] == pytest.approx(1 - (1 + 6 / 7 + 1) / 3)
    rows = slice_rows("case1_day0", review, counts, 2, ["a", "b", "c"])
    assert [(r["slice"], r["id"], r["organ"]) for r in rows] == [(2, "b", "small_bowel"), (3, "c", "stomach")]
    assert top_slices(review, 5) == [1]
    text = review_text("case1_day0", review, positions_mm=[0.0, -3.0, -6.0])
    assert "slice 2 of 3, z = -3.0 mm: 3 mm2 disputed (small_bowel 3 mm2)" in text


def test_auroc_is_mann_whitneys():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(30), 1)  # with ties
    positive = rng.random(30) < 0.3
    u = mannwhitneyu(scores[positive], scores[~positive]).statistic
    assert auroc(scores, positive) == pytest.approx(u / (positive.sum() * (~positive).sum()))
    assert math.isnan(auroc([1, 2], [True, True]))  # no negatives: no curve


def test_the_error_share_counts_the_most_disputed_slices_against_its_baselines():
    # 4 case-days x 5 slices: the errors sit on the 2 most disputed slices; the largest predicted
    # areas are elsewhere. The worst quarter (1 case-day) has the most disagreement.
    reviews, true, errors, areas = {}, {}, {}, {}
    for i in range(4):
        cd = f"case{i}_day0"
        disputed = [0.0] * 5
        err = [0] * 5
        if i < 2:
            disputed[i], err[i] = 50.0, 10
        reviews[cd] = {"disagreement": 0.9 - 0.2 * i, "slice_disputed_mm2": disputed, "members": 2}
        true[cd] = 0.5 + 0.1 * i
        errors[cd], areas[cd] = err, [0, 0, 0, 0, 100.0 + i]
    result = review_scores(reviews, true, errors, areas)
    assert result["flagged_slices"] == 2 and result["slices"] == 20
    assert result["worst_case_days"] == ["case0_day0"] and result["auroc_worst_quarter"] == 1.0
    assert result["error_share_flagged"] == 1.0 and result["error_share_by_predicted_area"] == 0.0
    assert result["error_share_at_random"] == pytest.approx(0.1)
