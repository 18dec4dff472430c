"""The competition metric and clinical distances: pure functions, numpy/scipy in, floats out.

This is the only implementation of the score in gitseg (training validation, search, ensemble
tuning and reports all call it). Definitions: docs/DATA.md.

  score = 0.4 * Dice + 0.6 * (1 - Hausdorff)

Dice is per (slice, class) row, rows where both masks are empty skipped. Hausdorff is per
(case-day, class) 3D volume, both empty skipped, exactly one empty = 1.

Hausdorff is exact (every foreground voxel counts, not only surfaces) yet far cheaper than comparing
all pairs of points: only voxels of one mask outside the other can be far from it, and their
nearest neighbour in the other mask is always one of its boundary voxels (see `_boundary_points`).
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, NamedTuple

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

HAUSDORFF_VARIANTS = ("kaggle", "diagonal")
DICE_WEIGHT, HAUSDORFF_WEIGHT = 0.4, 0.6


# ---------------------------------------------------------------------------------------------
# Dice: counts first, then the formula (counts can be summed across ranks before dividing).


def dice_counts(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Per-slice counts `(D, 3)`: |P∩G|, |P|, |G| for bool volumes `(D, H, W)`."""
    pred, gt = _check_pair(pred, gt)
    flat_p = pred.reshape(len(pred), -1)
    flat_g = gt.reshape(len(gt), -1)
    return np.stack(
        [np.count_nonzero(flat_p & flat_g, axis=1), np.count_nonzero(flat_p, axis=1),
         np.count_nonzero(flat_g, axis=1)],
        axis=1,
    ).astype(np.int64)


def dice_from_counts(counts: np.ndarray) -> np.ndarray:
    """Dice per row of `(..., 3)` counts; NaN where both masks are empty (row skipped)."""
    counts = np.asarray(counts, dtype=np.float64)
    inter, p, g = counts[..., 0], counts[..., 1], counts[..., 2]
    denom = p + g
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2.0 * inter / denom, np.nan)


def dice_per_slice(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Dice per slice `(D,)` of bool volumes `(D, H, W)`; NaN where both slices are empty."""
    return dice_from_counts(dice_counts(pred, gt))


def dice_3d(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of whole volumes (clinical reporting); NaN when both are empty."""
    return float(dice_from_counts(dice_counts(pred, gt).sum(axis=0)))


# ---------------------------------------------------------------------------------------------
# Hausdorff


def _check_pair(pred, gt) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth {gt.shape}")
    if pred.ndim != 3:
        raise ValueError(f"expected (D, H, W) volumes, got shape {pred.shape}")
    return pred.astype(bool, copy=False), gt.astype(bool, copy=False)


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box holding every True voxel of `mask`; None when there is none."""
    return _bbox(mask) if mask.any() else None


def _bbox(mask: np.ndarray) -> tuple[slice, ...]:
    box = []
    for axis in range(mask.ndim):
        other = tuple(i for i in range(mask.ndim) if i != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


_SIX_NEIGHBOURS = ndimage.generate_binary_structure(3, 1)


def _boundary_points(mask: np.ndarray) -> np.ndarray:
    """Coordinates `(N, 3)` of the voxels of a non-empty mask that have a 6-neighbour outside it.

    For a point outside the mask, the nearest mask voxel is always one of these: from an
    interior voxel, one step towards the point along an axis stays in the mask and gets closer.
    """
    box = _bbox(mask)
    crop = mask[box]
    interior = ndimage.binary_erosion(crop, _SIX_NEIGHBOURS, border_value=0)
    return np.argwhere(crop & ~interior) + np.array([b.start for b in box])


def directed_distances(src: np.ndarray, dst: np.ndarray, sampling) -> np.ndarray:
    """Distance from each voxel of `src` to the nearest voxel of `dst` (in no particular order).

    Both masks non-empty; `sampling` scales each axis. Exact: a k-d tree over the boundary
    voxels of `dst`, queried only with the `src` voxels outside `dst` (the others are at 0).
    """
    box = _bbox(src)
    offset = np.array([b.start for b in box])
    src_crop = src[box]
    outside = np.argwhere(src_crop & ~dst[box]) + offset
    n_inside = int(np.count_nonzero(src_crop)) - len(outside)
    if len(outside) == 0:
        return np.zeros(n_inside)
    scale = np.asarray(sampling, dtype=np.float64)
    tree = cKDTree(_boundary_points(dst) * scale)
    return np.concatenate([tree.query(outside * scale, k=1)[0], np.zeros(n_inside)])


def hausdorff_3d(pred: np.ndarray, gt: np.ndarray, variant: str = "kaggle") -> float:
    """Normalised 3D Hausdorff distance of bool volumes `(D, H, W)`, in [0, 1].

    variant "kaggle": coordinates divided by the shape (unit cube), symmetric, divided by √3.
    variant "diagonal": directed prediction → ground truth in voxels, divided by the volume
    diagonal and capped at 1 (the convention of many public notebooks).
    NaN when both are empty, 1.0 when exactly one is.
    """
    if variant not in HAUSDORFF_VARIANTS:
        raise ValueError(f"unknown Hausdorff variant {variant!r}; choose one of {HAUSDORFF_VARIANTS}")
    pred, gt = _check_pair(pred, gt)
    has_p, has_g = pred.any(), gt.any()
    if not has_p and not has_g:
        return math.nan
    if not (has_p and has_g):
        return 1.0
    shape = np.asarray(pred.shape, dtype=np.float64)
    if variant == "kaggle":
        sampling = 1.0 / shape
        d = max(directed_distances(pred, gt, sampling).max(), directed_distances(gt, pred, sampling).max())
        return float(d / math.sqrt(3.0))
    d = directed_distances(pred, gt, (1.0, 1.0, 1.0)).max()
    return float(min(d / math.sqrt(float((shape**2).sum())), 1.0))


def surface_distances(pred: np.ndarray, gt: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Surface-to-surface distances in mm: (pred surface → gt surface, gt surface → pred surface)."""
    pred, gt = _check_pair(pred, gt)
    surf_p = pred & ~ndimage.binary_erosion(pred, _SIX_NEIGHBOURS, border_value=0)
    surf_g = gt & ~ndimage.binary_erosion(gt, _SIX_NEIGHBOURS, border_value=0)
    return (directed_distances(surf_p, surf_g, spacing), directed_distances(surf_g, surf_p, spacing))


def hd95_mm(pred: np.ndarray, gt: np.ndarray, spacing) -> float:
    """95th percentile of the symmetric surface distances in mm; NaN both empty, inf one empty."""
    pred, gt = _check_pair(pred, gt)
    if not pred.any() and not gt.any():
        return math.nan
    if not (pred.any() and gt.any()):
        return math.inf
    a, b = surface_distances(pred, gt, spacing)
    return float(np.percentile(np.concatenate([a, b]), 95))


def assd_mm(pred: np.ndarray, gt: np.ndarray, spacing) -> float:
    """Average symmetric surface distance in mm; NaN both empty, inf one empty."""
    pred, gt = _check_pair(pred, gt)
    if not pred.any() and not gt.any():
        return math.nan
    if not (pred.any() and gt.any()):
        return math.inf
    a, b = surface_distances(pred, gt, spacing)
    return float(np.concatenate([a, b]).mean())


# ---------------------------------------------------------------------------------------------
# The competition score


def combine(dice: float, hausdorff: float) -> float:
    return DICE_WEIGHT * dice + HAUSDORFF_WEIGHT * (1.0 - hausdorff)


def score_terms(dice_rows: np.ndarray, hausdorff_rows) -> dict:
    """Mean Dice over (slice, class) rows and mean Hausdorff over (volume, class) pairs.

    When every row is skipped (both masks empty everywhere) the prediction is perfect:
    Dice 1 and Hausdorff 0.
    """
    dice_rows = np.asarray(dice_rows, dtype=np.float64)
    dice_rows = dice_rows[~np.isnan(dice_rows)]
    hausdorff_rows = np.asarray(hausdorff_rows, dtype=np.float64)
    hausdorff_rows = hausdorff_rows[~np.isnan(hausdorff_rows)]
    return score_from_sums(dice_rows.sum(), len(dice_rows), hausdorff_rows.sum(), len(hausdorff_rows))


def score_from_sums(dice_sum: float, dice_rows: int, hausdorff_sum: float, hausdorff_rows: int) -> dict:
    """`score_terms` from running sums and counts of the rows that are not skipped.

    Sums can be kept per class and per candidate (the ensemble's threshold search changes one
    class at a time) and combined without revisiting the rows.
    """
    dice = float(dice_sum / dice_rows) if dice_rows else 1.0
    hausdorff = float(hausdorff_sum / hausdorff_rows) if hausdorff_rows else 0.0
    return {"dice": dice, "hausdorff": hausdorff, "score": combine(dice, hausdorff)}


class ScoreSums(NamedTuple):
    """What a set of rows adds to the score: the sums and counts of its Dice and Hausdorff rows.

    Sums add, so a score over any grouping (per class, per case, per candidate threshold) is the
    sum of its parts' ScoreSums, scored once. Stacked in numpy, the last axis holds the fields in
    this order (the ensemble's threshold search keeps arrays `(classes, candidates, 4)`).
    """

    dice_sum: float = 0.0
    dice_rows: float = 0.0
    hausdorff_sum: float = 0.0
    hausdorff_rows: float = 0.0

    @classmethod
    def of_volume(cls, pred: np.ndarray, gt: np.ndarray) -> "ScoreSums":
        """One (case-day, class): its slices' Dice rows and its Hausdorff row (both-empty skipped)."""
        dice = dice_from_counts(dice_counts(pred, gt))
        valid = ~np.isnan(dice)
        hd = hausdorff_3d(pred, gt)
        return cls(float(dice[valid].sum()), float(valid.sum()), 0.0 if np.isnan(hd) else hd,
                   0.0 if np.isnan(hd) else 1.0)

    def __add__(self, other) -> "ScoreSums":  # field-wise, not tuple concatenation
        return ScoreSums(*(a + b for a, b in zip(self, other)))

    def terms(self) -> dict:
        """dice, hausdorff and score."""
        return score_from_sums(*self)

    @property
    def score(self) -> float:
        return self.terms()["score"]


class TruthScorer:
    """`ScoreSums.of_volume` of many candidate masks against one truth volume, faster.

    The post-processing search scores up to a dozen masks per (case-day, class), most of them
    subsets of one another (higher thresholds, components or slices removed). The slow part of
    Hausdorff is the distance from each predicted voxel outside the truth to the truth: here it is
    computed once per voxel, the first time a mask holds it, and kept. The other direction (truth
    to mask) changes with every mask; it is queried with the distance already reached as an upper
    bound, and only the truth voxels beyond it are measured exactly. Exact: the same distances and
    maxima as `of_volume`, kaggle convention (tests/test_metrics.py). `gt` may be a crop holding
    every True voxel of the truth and of every mask scored, with `shape` the whole volume's: the
    slices left out are empty in both (skipped Dice rows), distances do not depend on where the crop
    lies, and the normalisation is by the whole shape.
    """

    def __init__(self, gt: np.ndarray, shape=None):
        self.gt = np.asarray(gt, dtype=bool)
        self.scale = 1.0 / np.asarray(self.gt.shape if shape is None else shape, dtype=np.float64)
        self.has_gt = bool(self.gt.any())
        self._tree = cKDTree(_boundary_points(self.gt) * self.scale) if self.has_gt else None
        self._dist = np.zeros(self.gt.shape)          # voxel -> distance to the truth (0 inside it)
        self._known = self.gt.copy()                   # voxels whose distance is in _dist

    def sums(self, mask: np.ndarray) -> ScoreSums:
        mask = np.asarray(mask, dtype=bool)
        counts = dice_counts(mask, self.gt)
        dice = dice_from_counts(counts)
        valid = ~np.isnan(dice)
        has_pred = bool(counts[:, 1].any())
        if not has_pred and not self.has_gt:
            return ScoreSums(float(dice[valid].sum()), float(valid.sum()), 0.0, 0.0)
        hd = self._hausdorff(mask) if has_pred and self.has_gt else 1.0
        return ScoreSums(float(dice[valid].sum()), float(valid.sum()), hd, 1.0)

    def _hausdorff(self, mask: np.ndarray) -> float:
        new = mask & ~self._known
        if new.any():
            points = np.argwhere(new)
            self._dist[tuple(points.T)] = self._tree.query(points * self.scale, k=1)[0]
            self._known |= new
        reached = float(self._dist[mask].max())      # mask -> truth
        missed = np.argwhere(self.gt & ~mask)          # truth -> mask: only truth voxels outside it
        if len(missed):
            tree = cKDTree(_boundary_points(mask) * self.scale)
            bounded, _ = tree.query(missed * self.scale, k=1, distance_upper_bound=reached)
            beyond = ~np.isfinite(bounded)
            if beyond.any():
                reached = max(reached, float(tree.query(missed[beyond] * self.scale, k=1)[0].max()))
        return reached / math.sqrt(3.0)


def class_scores(sums: Mapping[str, ScoreSums]) -> dict:
    """score, dice, hausdorff over all classes, and `<name>/<class>` for each, from per-class sums."""
    out = sum(sums.values(), ScoreSums()).terms()
    for cls, part in sums.items():
        for name, value in part.terms().items():
            out[f"{name}/{cls}"] = value
    return out


def sum_rows(rows: Iterable[tuple[str, Iterable[float]]], classes) -> dict[str, ScoreSums]:
    """Per-class ScoreSums of `(class, sums)` rows, every class of `classes` present."""
    totals = {cls: ScoreSums() for cls in classes}
    for cls, sums in rows:
        totals[cls] = totals[cls] + ScoreSums(*sums)
    return totals


def volume_stats(pred: np.ndarray, gt: np.ndarray, variant: str = "kaggle") -> tuple[np.ndarray, float]:
    """What one (case-day, class) volume contributes: per-slice Dice counts `(D, 3)` and its Hausdorff.

    Plain numbers, so they can be gathered across processes and summarised once.
    """
    return dice_counts(pred, gt), hausdorff_3d(pred, gt, variant)


def summarise(stats, variant: str = "kaggle", classes=None) -> dict:
    """Competition score from `(class, dice counts (D, 3), hausdorff)` items, one per volume and class.

    Returns dice, hausdorff, score, the Hausdorff variant, and per class `dice/<class>`,
    `hausdorff/<class>`, `score/<class>`.
    """
    dice_rows: dict = {}
    hausdorff: dict = {}
    for cls, counts, hd in stats:
        dice_rows.setdefault(cls, []).append(dice_from_counts(counts))
        hausdorff.setdefault(cls, []).append(hd)

    def flat(groups):
        return np.concatenate(groups) if groups else np.array([])

    result = score_terms(flat([flat(v) for v in dice_rows.values()]), [h for v in hausdorff.values() for h in v])
    result["variant"] = variant
    for cls in classes or sorted(dice_rows):
        terms = score_terms(flat(dice_rows.get(cls, [])), hausdorff.get(cls, []))
        for name in ("dice", "hausdorff", "score"):
            result[f"{name}/{cls}"] = terms[name]
    return result


def competition_score(preds: Mapping, gts: Mapping, variant: str = "kaggle", classes=None) -> dict:
    """Competition score over `{(case_day, class): bool (D, H, W)}` mappings with equal keys."""
    if set(preds) != set(gts):
        missing = sorted(set(gts) - set(preds))[:5]
        extra = sorted(set(preds) - set(gts))[:5]
        raise ValueError(f"prediction and ground-truth keys differ (missing {missing}, extra {extra})")
    stats = []
    for key in sorted(gts, key=str):
        cls = key[1] if isinstance(key, tuple) and len(key) > 1 else "all"
        stats.append((cls, *volume_stats(preds[key], gts[key], variant)))
    return summarise(stats, variant, classes)


def soft_dice(items) -> float:
    """Mean over classes of 2 sum(p g) / (sum p + sum g) from `(class, (sum p g, sum p, sum g))`
    items; a class with neither probability nor truth anywhere counts 1 (nothing to find, nothing drawn)."""
    sums: dict = {}
    for cls, soft in items:
        sums[cls] = sums.get(cls, np.zeros(3)) + np.asarray(soft, dtype=np.float64)
    values = [1.0 if a[1] + a[2] == 0 else 2 * a[0] / (a[1] + a[2]) for a in sums.values()]
    return float(np.mean(values)) if values else float("nan")
