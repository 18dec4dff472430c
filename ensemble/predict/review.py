"""Where to look first: the ensemble members' disagreement as a review list (issue 35).

Every member network votes on every voxel: its own probabilities (with the ensemble's TTA) at the
ensemble's per-class thresholds, before any post-processing. Only the vote counts are kept
(`Votes`: uint8 `(3, D, H, W)`, 48 MB for a 144 x 360 x 310 case-day), from which both figures
follow exactly:

- agreement: the members' pooled pairwise Dice, sum over member pairs of 2|A_i & A_j| over the sum
  of |A_i| + |A_j|. With c the number of members that mark a voxel, that is
  sum c(c - 1) / ((M - 1) sum c): 1 where the members mark the same voxels (or none), 0 where no
  two of them overlap. Disagreement is 1 - agreement; a case-day's is the mean over the organs of
  their whole-volume agreement.
- disputed area: per slice and organ, the area (mm^2) that some members mark and others do not.

The slices with the largest disputed area, and the case-days with the largest disagreement, are
the ones to review first. How far that is worth trusting is measured on the holdout by
`gitseg ensemble` (`review_scores`: AUROC for the worst quarter of case-days, the share of all
error voxels in the 10% most disputed slices) and shown in the report.

NumPy only: both engines (PyTorch, ONNX Runtime) fill `Votes` as they run the members.
"""

from __future__ import annotations

import math

import numpy as np

from gitseg.data.uwmgi import CLASSES

WORST_SHARE = 0.25      # the case-days to find: the worst quarter by true score
FLAGGED_SLICES = 0.10   # the slices flagged for review: the 10% most disputed


class Votes:
    """Member vote counts `(3, D, H, W)` uint8 at `thresholds` (one per class), filled batch by batch
    by the engines: `add(start, masks)` with one member's bool masks `(3, B, H, W)` of slices
    `start .. start + B`. `members`: how many member networks voted."""

    def __init__(self, thresholds, shape):
        self.thresholds = np.asarray(thresholds, dtype=np.float32)
        if self.thresholds.shape != (len(CLASSES),):
            raise ValueError(f"give one threshold per class ({len(CLASSES)}), got {self.thresholds.shape}")
        self.counts = np.zeros((len(CLASSES), *shape), dtype=np.uint8)
        self.members = 0

    def add(self, start: int, masks: np.ndarray) -> None:
        self.counts[:, start:start + masks.shape[1]] += masks


def pixel_mm2(spacing) -> float:
    """A pixel's area in mm^2 from a (slice, row, column) spacing in mm, as the cache and the readers
    give it."""
    return float(spacing[1]) * float(spacing[2])


def largest_first(values) -> np.ndarray:
    """Indices of `values` from the largest down; ties in index order."""
    values = np.asarray(values, dtype=np.float64)
    return np.lexsort((np.arange(len(values)), -values))


def pooled_agreement(counts: np.ndarray, members: int, axis=None) -> np.ndarray:
    """Pooled pairwise Dice of `members` members from their vote `counts`, reduced over `axis` (1 where
    no member marks anything there). NaN for fewer than two members: one network cannot disagree."""
    c = counts.astype(np.int64)
    marked = c.sum(axis=axis)
    if members < 2:
        return np.full(np.shape(marked), np.nan)
    pairs = (c * (c - 1)).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(marked > 0, pairs / ((members - 1) * np.maximum(marked, 1)), 1.0)


def disputed(counts: np.ndarray, members: int) -> np.ndarray:
    """bool `(3, D, H, W)`: voxels some members mark and others do not."""
    return (counts > 0) & (counts < members)


def case_day_review(counts: np.ndarray, members: int, spacing) -> dict:
    """One case-day's review figures: disagreement (1 - mean organ agreement), each organ's agreement,
    and per slice the disputed area in mm^2 (all organs; `slice_disputed_mm2`) and per organ.
    `spacing`: (slice, row, column) in mm."""
    organ = pooled_agreement(counts, members, axis=(1, 2, 3))  # (3,)
    per_slice = disputed(counts, members).sum(axis=(2, 3)) * pixel_mm2(spacing)  # (3, D)
    return {"disagreement": float(1.0 - np.mean(organ)) if members >= 2 else math.nan,
            "agreement": {cls: float(organ[c]) for c, cls in enumerate(CLASSES)},
            "slice_disputed_mm2": per_slice.sum(axis=0).round(2).tolist(),
            "organ_disputed_mm2": {cls: per_slice[c].round(2).tolist() for c, cls in enumerate(CLASSES)},
            "members": members}


def slice_rows(case_day: str, review: dict, counts: np.ndarray, members: int, slice_ids=None) -> list[dict]:
    """The review table's rows of one case-day: one per (slice, organ) that any member marks, with the
    organ's agreement on that slice and its disputed area. Slices are numbered from 1, as the Kaggle
    ids (slice_0001) and DICOM instance numbers are."""
    agreement = pooled_agreement(counts, members, axis=(2, 3))  # (3, D)
    marked = (counts > 0).any(axis=(2, 3))
    rows = []
    for z in range(counts.shape[1]):
        for c, cls in enumerate(CLASSES):
            if marked[c, z]:
                rows.append({"case_day": case_day, "slice": z + 1,
                             "id": slice_ids[z] if slice_ids is not None else "",
                             "organ": cls, "agreement": round(float(agreement[c, z]), 4),
                             "disputed_mm2": review["organ_disputed_mm2"][cls][z]})
    return rows


def votes_for(model, shape) -> Votes | None:
    """A vote counter for the members of `model` (either engine) on a scan of `shape` `(D, H, W)` at
    the ensemble's thresholds; None for one member, which has nobody to disagree with."""
    return Votes(model.post.thresholds, shape) if len(model.members) >= 2 else None


def review_order(reviews: dict[str, dict]) -> list[str]:
    """Case-days, most disagreement first."""
    return sorted(reviews, key=lambda cd: -np.nan_to_num(reviews[cd]["disagreement"], nan=-1.0))


def top_slices(review: dict, n: int) -> list[int]:
    """The `n` slices of a case-day with the largest disputed area (ties: lower slice first)."""
    area = review["slice_disputed_mm2"]
    return [int(z) for z in largest_first(area)[:n] if area[z] > 0]


def auroc(scores, positive) -> float:
    """Area under the ROC curve of `scores` for the `positive` (bool) items: the probability that a
    positive outranks a negative, ties counted half (Mann-Whitney). NaN without both kinds."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def review_scores(reviews: dict[str, dict], true_scores: dict[str, float], slice_errors: dict[str, list[int]],
                  slice_areas: dict[str, list[float]]) -> dict:
    """How far the review list is worth trusting, on case-days with known truth.

    `reviews`: case_day_review of each case-day; `true_scores`: each case-day's competition score;
    `slice_errors`: per case-day and slice, the voxels where the ensemble's masks differ from the
    truth (all organs); `slice_areas`: per case-day and slice, the area the ensemble's masks cover
    (mm^2, all organs). Returns the AUROC of the case-day disagreement for finding the worst
    WORST_SHARE of case-days by true score (0.5: no better than chance), and the share of all error
    voxels in the FLAGGED_SLICES most disputed slices against two baselines: as many slices at
    random, and as many slices with the largest predicted area (errors sit on organ boundaries, so
    the slices with most organ hold many of them: the list must do better than that to help)."""
    case_days = sorted(reviews)
    if len(case_days) < 2:
        return {}
    worst_n = max(1, math.ceil(WORST_SHARE * len(case_days)))
    worst = set(sorted(case_days, key=lambda cd: (true_scores[cd], cd))[:worst_n])
    area = np.concatenate([np.asarray(reviews[cd]["slice_disputed_mm2"], dtype=np.float64) for cd in case_days])
    errors = np.concatenate([np.asarray(slice_errors[cd], dtype=np.float64) for cd in case_days])
    flagged_n = max(1, math.ceil(FLAGGED_SLICES * len(area)))
    predicted = np.concatenate([np.asarray(slice_areas[cd], dtype=np.float64) for cd in case_days])

    def share(ranking) -> float:  # error voxels in the flagged_n slices ranked first
        return float(errors[largest_first(ranking)[:flagged_n]].sum() / total_errors) if total_errors else math.nan

    total_errors = float(errors.sum())
    return {"case_days": len(case_days), "worst_case_days": sorted(worst), "slices": int(len(area)),
            "flagged_slices": flagged_n,
            "auroc_worst_quarter": auroc([reviews[cd]["disagreement"] for cd in case_days],
                                         [cd in worst for cd in case_days]),
            "error_share_flagged": share(area), "error_share_by_predicted_area": share(predicted),
            "error_share_at_random": flagged_n / len(area),
            "members": int(reviews[case_days[0]]["members"])}


def review_text(case_day: str, review: dict, positions_mm=None, n: int = 10) -> str:
    """The short review list written beside a clinical output (rtstruct.dcm): the case-day's
    disagreement and its `n` most disputed slices, numbered from 1 in the scan's order (head first)
    and, where known, with the table position `positions_mm[z]`."""
    lines = [f"gitseg review list for {case_day}: where the ensemble's {review['members']} members disagree",
             f"disagreement {review['disagreement']:.3f} (0: every member marks the same voxels; 1: no two overlap)",
             "organ agreement (pooled pairwise Dice of the members): "
             + ", ".join(f"{cls} {v:.3f}" for cls, v in review["agreement"].items()),
             f"slices to review first (the {n} with the largest area some members mark and others do not):"]
    for z in top_slices(review, n):
        where = f", z = {positions_mm[z]:.1f} mm" if positions_mm is not None else ""
        organs = ", ".join(f"{cls} {review['organ_disputed_mm2'][cls][z]:.0f} mm2" for cls in CLASSES
                           if review["organ_disputed_mm2"][cls][z] > 0)
        lines.append(f"  slice {z + 1} of {len(review['slice_disputed_mm2'])}{where}: "
                     f"{review['slice_disputed_mm2'][z]:.0f} mm2 disputed ({organs})")
    if len(lines) == 4:
        lines.append("  none: the members mark the same voxels on every slice")
    return "\n".join(lines) + "\n"


def review_summary(review: dict) -> str:
    """What the review list is worth on a holdout (`review_scores`), in one sentence."""
    return (f"on {review['case_days']} case-days ({review['members']} members) the disagreement finds the worst "
            f"quarter of case-days with AUROC {review['auroc_worst_quarter']:.2f} (0.5: chance); the "
            f"{review['flagged_slices']} most disputed of {review['slices']} slices hold "
            f"{review['error_share_flagged']:.0%} of the error voxels, against "
            f"{review['error_share_by_predicted_area']:.0%} for as many slices with the most predicted organ and "
            f"{review['error_share_at_random']:.0%} at random")
