"""The baseline of the post-processing benchmark: `ensemble.selection.postprocess.tune`'s search done naively.

Same candidates and the same coordinate ascent over classes, but every candidate is
post-processed with `apply` and scored from scratch with the competition metric. Kept to check
`tune` against (the same optimum, tests/test_postprocess.py) and to time it (bench_ensemble.py).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import numpy as np

from ensemble.selection.postprocess import (
    CLASS_TOLERANCE,
    GATE_THRESHOLDS,
    MIN_PIXELS,
    MIN_SIZES,
    THRESHOLDS,
    PostProcess,
    apply,
    unpack_volume,
)
from gitseg.data.uwmgi import CLASSES
from gitseg.metrics import competition_score


def tune_naive(load_volumes: Callable[[], Iterable], thresholds=THRESHOLDS, min_sizes=MIN_SIZES,
               min_pixels=MIN_PIXELS, gate_thresholds=GATE_THRESHOLDS,
               class_tolerance=CLASS_TOLERANCE) -> PostProcess:
    """The benchmark baseline: the same search, every candidate scored from scratch with `apply`.

    Same coordinate ascent over classes, but each evaluation post-processes and scores all volumes
    and classes again. Kept only to check `tune` against (same optimum) and to time it.
    """
    def scores(post):
        preds, gts = {}, {}
        for i, (probs, gt, gate) in enumerate(map(unpack_volume, load_volumes())):
            masks = apply(np.asarray(probs, dtype=np.float32), post, gate)
            for c, cls in enumerate(CLASSES):
                preds[(i, cls)], gts[(i, cls)] = masks[c], gt[c]
        return competition_score(preds, gts)

    score = lambda post: scores(post)["score"]  # noqa: E731

    post = PostProcess()
    steps = [("thresholds", thresholds), ("min_size", min_sizes), ("min_pixels", min_pixels)]
    if all(gate is not None for _, _, gate in map(unpack_volume, load_volumes())):
        steps.append(("gate", gate_thresholds))
    for name, grid in steps:
        values = list(getattr(post, name))
        start = score(post)
        for _ in range(10):
            changed = False
            for c in range(len(CLASSES)):
                best_v, best = values[c], score(dataclasses.replace(post, **{name: values}))
                for v in grid:
                    trial = values[:c] + [v] + values[c + 1:]
                    s = score(dataclasses.replace(post, **{name: trial}))
                    if s > best + 1e-12:
                        best_v, best = v, s
                if best_v != values[c]:
                    values[c], changed = best_v, True
            if not changed:
                break
        candidate = dataclasses.replace(post, **{name: values})
        before, after = scores(post), scores(candidate)
        if name == "thresholds" or (after["score"] > start and all(
                after[f"score/{cls}"] >= before[f"score/{cls}"] - class_tolerance for cls in CLASSES)):
            post = candidate
    return post
