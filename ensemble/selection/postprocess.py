"""From probabilities to masks: per-class thresholds, small-component removal, empty-slice rule.

`apply` is what prediction runs. `tune` chooses the parameters on out-of-fold probabilities
against the full competition metric, one step at a time, and keeps a step only if it raises the
out-of-fold score.

Why it is fast: the score is a ratio of sums over rows (Dice per slice and class, Hausdorff per
volume and class), so the sums are kept per class and per candidate and every combination of
per-class choices is scored without touching a voxel. Within a class, a candidate whose mask is
provably the same as one already scored reuses that score: a higher threshold that keeps the same
number of voxels, a larger minimum size that removes the same components, a larger pixel minimum
that empties the same slices. Only genuinely new masks pay for a Hausdorff distance.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import numpy as np
from scipy import ndimage

from gitseg.data.uwmgi import CLASSES
from gitseg.metrics import ScoreSums, TruthScorer, bounding_box, class_scores, sum_rows

THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.20, 0.751, 0.05))
MIN_SIZES = (0, 10, 25, 50, 100, 200, 400, 800)   # voxels of a 3D connected component, original size
MIN_PIXELS = (0, 5, 10, 20, 40, 80, 160)         # predicted pixels below which a slice is emptied
GATE_THRESHOLDS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)  # gate probability below which a slice is emptied
# A post-processing step may lower one class's OOF score by at most this much (nnU-Net keeps a step
# only if no class gets worse; a small tolerance keeps rounding-level losses from vetoing a step).
CLASS_TOLERANCE = 0.001
# 26-connectivity: voxels touching at an edge or a corner are one component (thin bowel loops
# cross slices diagonally).
_CONNECTIVITY = ndimage.generate_binary_structure(3, 3)


@dataclasses.dataclass
class PostProcess:
    """Per-class parameters, class order CLASSES."""

    thresholds: list[float] = dataclasses.field(default_factory=lambda: [0.5] * len(CLASSES))
    min_size: list[int] = dataclasses.field(default_factory=lambda: [0] * len(CLASSES))    # 0: off
    min_pixels: list[int] = dataclasses.field(default_factory=lambda: [0] * len(CLASSES))  # 0: off
    # The empty-slice gate: a class is emptied in a slice whose gate probability is below this; 0: off
    # (and always off for models without a gate head).
    gate: list[float] = dataclasses.field(default_factory=lambda: [0.0] * len(CLASSES))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PostProcess":
        names = ("thresholds", "min_size", "min_pixels", "gate")
        post = cls(**{k: list(v) for k, v in data.items() if k in names})  # older manifests have no gate: off
        for name in names:
            if len(getattr(post, name)) != len(CLASSES):
                raise ValueError(f"post-processing {name} needs one value per class {CLASSES}")
        return post


def remove_small_components(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Drop 3D connected components of `mask` `(D, H, W)` with fewer than `min_size` voxels."""
    if min_size <= 0 or not mask.any():
        return mask
    labels, n = ndimage.label(mask, _CONNECTIVITY)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


def empty_sparse_slices(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """Empty the slices of `mask` `(D, H, W)` that have fewer than `min_pixels` positive pixels."""
    if min_pixels <= 0:
        return mask
    counts = mask.reshape(len(mask), -1).sum(axis=1)
    return mask & (counts >= min_pixels)[:, None, None]


def gate_slices(mask: np.ndarray, gate: np.ndarray | None, threshold: float) -> np.ndarray:
    """Empty the slices of `mask` `(D, H, W)` whose gate probability `(D,)` is below `threshold`."""
    if gate is None or threshold <= 0:
        return mask
    return mask & (np.asarray(gate) >= threshold)[:, None, None]


def class_mask(prob: np.ndarray, threshold: float, min_size: int = 0, min_pixels: int = 0, gate=None,
               gate_threshold: float = 0.0) -> np.ndarray:
    """bool `(D, H, W)` from one class's probabilities `(D, H, W)` (and gate `(D,)`), the steps in order."""
    mask = prob >= threshold
    mask = remove_small_components(mask, min_size)
    mask = empty_sparse_slices(mask, min_pixels)
    return gate_slices(mask, gate, gate_threshold)


def apply(probs: np.ndarray, post: PostProcess, gate: np.ndarray | None = None) -> np.ndarray:
    """bool masks `(3, D, H, W)` from probabilities `(3, D, H, W)` and, for models with a gate head,
    gate probabilities `(3, D)` (None: the gate rule is off)."""
    return np.stack([class_mask(probs[c], post.thresholds[c], post.min_size[c], post.min_pixels[c],
                                None if gate is None else gate[c], post.gate[c])
                     for c in range(len(CLASSES))])


# ---------------------------------------------------------------------------------------------
# Tuning on out-of-fold probabilities


def total_score(sums: np.ndarray) -> float:
    """Competition score from per-class ScoreSums stacked as `(C, 4)`."""
    return ScoreSums(*sums.sum(axis=0)).score


def _choose(sums: np.ndarray, current: list[int]) -> list[int]:
    """Per-class candidate indices maximising the total score, from ScoreSums `(C, K, 4)`.

    Coordinate ascent: the classes interact only through the shared denominators, so a few rounds
    settle. A candidate replaces the current one only if it scores strictly higher (ties keep the
    earlier, simpler choice).
    """
    chosen = list(current)
    for _ in range(10):
        changed = False
        for c in range(sums.shape[0]):
            base = [sums[k, chosen[k]] for k in range(sums.shape[0])]
            best_k, best = chosen[c], total_score(np.array(base))
            for k in range(sums.shape[1]):
                base[c] = sums[c, k]
                score = total_score(np.array(base))
                if score > best + 1e-12:
                    best_k, best = k, score
            if best_k != chosen[c]:
                chosen[c], changed = best_k, True
        if not changed:
            break
    return chosen


def unpack_volume(volume: tuple) -> tuple:
    """(probs, gt, gate or None) from a loader's `(probs, gt)` or `(probs, gt, gate)`."""
    return (*volume, None) if len(volume) == 2 else tuple(volume)


def crop_box(prob: np.ndarray, gt: np.ndarray, floor: float) -> tuple[slice, ...] | None:
    """The box holding every voxel of `gt` and every voxel with probability >= `floor`: every mask
    made at a threshold of at least `floor` (and then only emptied further) lies inside it, so it can
    be scored on the crop (`TruthScorer` with the whole shape). None: nothing anywhere."""
    return bounding_box((prob >= floor) | gt)


def _stage_sums(volumes: Iterable, candidates, masks_for: Callable, floor: float) -> tuple[np.ndarray, int, int, bool]:
    """ScoreSums `(C, K, 4)` over volumes for K candidates per class.

    `masks_for(prob, c, candidates, gate)` yields `(key, mask)` per candidate, where equal keys promise
    equal masks; a mask is scored once per key. Each class volume is cropped to `crop_box` first
    (`floor`: the lowest threshold any candidate mask is made at): at the real data's size an organ's
    box is a small part of the scan, and every candidate then works on the crop only. Returns the
    sums, the masks scored, the candidate evaluations and whether every volume had gate probabilities.
    """
    sums = np.zeros((len(CLASSES), len(candidates), 4))
    scored = evaluated = 0
    gated = None  # None until a volume is seen
    for probs, gt, gate in map(unpack_volume, volumes):
        gated = gated is not False and gate is not None
        for c in range(len(CLASSES)):
            box = crop_box(probs[c], gt[c], floor)
            if box is None:  # no candidate mask and no truth: both empty everywhere, nothing to add
                evaluated += len(candidates)
                continue
            gate_c = None if gate is None else np.asarray(gate[c])[box[0]]
            seen: dict = {}
            scorer = TruthScorer(gt[c][box], shape=gt[c].shape)
            for k, (key, mask) in enumerate(masks_for(probs[c][box], c, candidates, gate_c)):
                evaluated += 1
                if key not in seen:
                    seen[key] = scorer.sums(mask())
                    scored += 1
                sums[c, k] += seen[key]
    return sums, scored, evaluated, bool(gated)


def threshold_sums(prob: np.ndarray, gt: np.ndarray, thresholds=THRESHOLDS) -> np.ndarray:
    """ScoreSums `(K, 4)` of one class volume at each threshold; a threshold that keeps the same
    number of voxels as a lower one keeps the same mask and reuses its sums."""
    prob, gt = np.asarray(prob, dtype=np.float32), np.asarray(gt, dtype=bool)
    out, seen = np.zeros((len(thresholds), 4)), {}
    box = crop_box(prob, gt, min(thresholds))
    if box is None:  # both empty at every threshold: no row
        return out
    prob_crop, scorer = prob[box], TruthScorer(gt[box], shape=gt.shape)
    for k, t in enumerate(thresholds):
        mask = prob_crop >= t
        count = int(np.count_nonzero(mask))
        if count not in seen:
            seen[count] = np.asarray(scorer.sums(mask))
        out[k] = seen[count]
    return out


def best_thresholds(sums: np.ndarray, thresholds=THRESHOLDS) -> tuple[list[float], float]:
    """Per-class thresholds and the score they reach, from ScoreSums `(C, K, 4)` over volumes: the
    search of `tune`'s first step, starting from 0.5."""
    thresholds = list(thresholds)
    default = [thresholds.index(0.5) if 0.5 in thresholds else 0] * sums.shape[0]
    chosen = _choose(sums, default)
    return [float(thresholds[k]) for k in chosen], total_score(np.array([sums[c, k] for c, k in enumerate(chosen)]))


def tune(load_volumes: Callable[[], Iterable], thresholds=THRESHOLDS, min_sizes=MIN_SIZES, min_pixels=MIN_PIXELS,
         gate_thresholds=GATE_THRESHOLDS, log=print,
         class_tolerance: float = CLASS_TOLERANCE) -> tuple[PostProcess, list[dict]]:
    """Tune thresholds, then minimum component size, then the empty-slice rule, then (for models with
    a gate head) the gate, on out-of-fold data. The steps after the thresholds are kept only if they
    raise the OOF score and lower no class's score by more than `class_tolerance`; the gate step
    applies on top of the pixel rule, so the gate is tuned alone (pixel rule rejected) or combined.

    `load_volumes()` yields `(probs (3, D, H, W), gt bool (3, D, H, W))`, with the gate probabilities
    `(3, D)` (or None) as a third element for gated models; it is called once per step so the volumes
    need not fit in memory together. Returns the parameters and one record per step (score before
    and after, kept or not, masks scored vs candidates evaluated).
    """
    thresholds, min_sizes, min_pixels = list(thresholds), list(min_sizes), list(min_pixels)
    post = PostProcess()
    steps = []

    floor = min(thresholds)  # every mask of every step is made at one of the thresholds

    def threshold_masks(prob, c, candidates, gate):
        prob = np.asarray(prob, dtype=np.float32)
        for t in candidates:
            mask = prob >= t
            # Masks shrink as the threshold grows: the same voxel count means the same mask.
            yield int(np.count_nonzero(mask)), (lambda m=mask: m)

    start = [thresholds.index(0.5)] if 0.5 in thresholds else [0]
    sums, scored, evaluated, gated = _stage_sums(load_volumes(), thresholds, threshold_masks, floor)
    default = start * len(CLASSES)
    chosen = _choose(sums, default)
    post.thresholds = [float(thresholds[k]) for k in chosen]
    steps.append(_record("thresholds", sums, default, chosen, scored, evaluated, post.thresholds, kept=True))
    log(f"ensemble: thresholds {post.thresholds}  OOF score {steps[-1]['before']:.4f} -> {steps[-1]['after']:.4f}")

    def size_masks(prob, c, candidates, gate):
        mask = np.asarray(prob, dtype=np.float32) >= post.thresholds[c]
        labels, n = ndimage.label(mask, _CONNECTIVITY) if mask.any() else (None, 0)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:] if n else np.zeros(0, int)
        for m in candidates:
            # Larger minimums remove a superset of components: the same count means the same mask.
            removed = int((sizes < m).sum()) if m > 0 else 0
            yield removed, (lambda m=m: np.concatenate([[False], sizes >= m])[labels] if n else mask)

    sums, scored, evaluated, _ = _stage_sums(load_volumes(), min_sizes, size_masks, floor)
    post.min_size = _keep_if_better(sums, min_sizes, steps, "min_size", scored, evaluated, class_tolerance)
    log(f"ensemble: minimum component size {post.min_size}  ({'kept' if steps[-1]['kept'] else 'rejected'}: "
        f"{steps[-1]['before']:.4f} -> {steps[-1]['after']:.4f})")

    def pixel_masks(prob, c, candidates, gate):
        mask = class_mask(np.asarray(prob, dtype=np.float32), post.thresholds[c], post.min_size[c])
        counts = mask.reshape(len(mask), -1).sum(axis=1)
        for p in candidates:
            emptied = int(((counts > 0) & (counts < p)).sum())
            yield emptied, (lambda p=p: empty_sparse_slices(mask, p))

    sums, scored, evaluated, _ = _stage_sums(load_volumes(), min_pixels, pixel_masks, floor)
    post.min_pixels = _keep_if_better(sums, min_pixels, steps, "min_pixels", scored, evaluated, class_tolerance)
    log(f"ensemble: empty-slice minimum pixels {post.min_pixels}  ({'kept' if steps[-1]['kept'] else 'rejected'}: "
        f"{steps[-1]['before']:.4f} -> {steps[-1]['after']:.4f})")
    if not gated:
        return post, steps  # no gate head (or not every volume has one): the rules above, unchanged

    def gate_masks(prob, c, candidates, gate):
        mask = class_mask(np.asarray(prob, dtype=np.float32), post.thresholds[c], post.min_size[c], post.min_pixels[c])
        present = mask.reshape(len(mask), -1).any(axis=1)
        for t in candidates:
            # Higher thresholds empty a superset of slices: the same count means the same mask.
            emptied = int((present & (gate < t)).sum()) if t > 0 else 0
            yield emptied, (lambda t=t: gate_slices(mask, gate, t))

    sums, scored, evaluated, _ = _stage_sums(load_volumes(), gate_thresholds, gate_masks, floor)
    post.gate = [float(v) for v in _keep_if_better(sums, list(gate_thresholds), steps, "gate", scored, evaluated,
                                                   class_tolerance)]
    log(f"ensemble: empty-slice gate thresholds {post.gate}  ({'kept' if steps[-1]['kept'] else 'rejected'}: "
        f"{steps[-1]['before']:.4f} -> {steps[-1]['after']:.4f})")
    return post, steps


def _keep_if_better(sums, candidates, steps, name, scored, evaluated, class_tolerance) -> list[int]:
    """nnU-Net's rule: keep the step if it raises the OOF score and lowers no class's score by more
    than `class_tolerance`; otherwise every class goes back to candidate 0 (off)."""
    off = [candidates.index(0)] * len(CLASSES)  # candidate 0 (off) reproduces the previous step
    chosen = _choose(sums, off)
    values = [candidates[k] for k in chosen]
    record = _record(name, sums, off, chosen, scored, evaluated, values, kept=False)
    record["class_before"] = [ScoreSums(*sums[c, k]).score for c, k in enumerate(off)]
    record["class_after"] = [ScoreSums(*sums[c, k]).score for c, k in enumerate(chosen)]
    record["kept"] = record["after"] > record["before"] and all(
        a >= b - class_tolerance for a, b in zip(record["class_after"], record["class_before"]))
    if not record["kept"]:
        values = [0] * len(CLASSES)
        record["values"] = values
    steps.append(record)
    return values


def _record(name, sums, before, after, scored, evaluated, values, kept) -> dict:
    pick = lambda idx: np.array([sums[c, k] for c, k in enumerate(idx)])  # noqa: E731
    return {"step": name, "values": values, "before": total_score(pick(before)), "after": total_score(pick(after)),
            "kept": kept, "masks_scored": scored, "candidates_evaluated": evaluated}


def scores_with(load_volumes: Callable[[], Iterable], post: PostProcess) -> dict:
    """Competition score, Dice and Hausdorff, overall and per class (`score/<class>` ...), of
    `post` applied to every volume `load_volumes()` yields: what tuning reached on OOF data."""
    rows = ((cls, ScoreSums.of_volume(masks[c], gt[c]))
            for probs, gt, gate in map(unpack_volume, load_volumes()) for masks in [apply(probs, post, gate)]
            for c, cls in enumerate(CLASSES))
    return class_scores(sum_rows(rows, CLASSES))
