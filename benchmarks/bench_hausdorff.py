"""hausdorff_3d vs the brute-force reference (scipy directed_hausdorff over all foreground voxels).

Realistic volumes: synthetic phantom scans at the real size (144 x 266 x 266), their organ masks as
ground truth, and predictions made from them the way a model errs: the organ shifted by a few
voxels, eroded or dilated, with a false-positive blob, or a missed slice range. Both functions see
the same pairs; the results must agree to 1e-9. Prints the time per pair and the ratio.

    python benchmarks/bench_hausdorff.py [--scans 2]
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import numpy as np
from scipy import ndimage
from scipy.spatial.distance import directed_hausdorff

from gitseg.data.synth import ScanGeometry, render_scan, sample_case
from gitseg.metrics import hausdorff_3d


def brute_force(pred, gt):
    shape = np.array(pred.shape, dtype=float)
    a, b = np.argwhere(pred) / shape, np.argwhere(gt) / shape
    return max(directed_hausdorff(a, b)[0], directed_hausdorff(b, a)[0]) / math.sqrt(3)


def predictions(gt, rng):
    """Model-like errors of one organ mask."""
    yield np.roll(gt, (int(rng.integers(-2, 3)), int(rng.integers(-4, 5)), int(rng.integers(-4, 5))), axis=(0, 1, 2))
    yield ndimage.binary_erosion(gt, iterations=2)
    dilated = ndimage.binary_dilation(gt, iterations=2)
    z, y, x = (int(v) for v in np.argwhere(gt)[0])
    dilated[z, min(y + 60, gt.shape[1] - 1), min(x + 60, gt.shape[2] - 1)] = True  # a false-positive voxel
    yield dilated
    missed = gt.copy()
    zs = np.flatnonzero(gt.any(axis=(1, 2)))
    missed[zs[: len(zs) // 3]] = False
    yield missed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=2)
    args = parser.parse_args()
    geo = ScanGeometry(width=266, height=266, spacing=1.5, slices=144)
    pairs = []
    for seed in range(args.scans):
        rng = np.random.default_rng(seed)
        _, masks = render_scan(sample_case(rng), geo, rng)
        for organ in masks:
            pairs += [(p, organ) for p in predictions(organ, rng) if p.any()]
    print(f"{len(pairs)} (prediction, ground truth) pairs of shape {geo.shape}, "
          f"mean foreground {np.mean([g.sum() for _, g in pairs]):.0f} voxels")

    for pred, gt in pairs[:2]:  # warm-up
        hausdorff_3d(pred, gt)
    t0 = time.perf_counter()
    fast = [hausdorff_3d(p, g) for p, g in pairs]
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow = [brute_force(p, g) for p, g in pairs]
    t_slow = time.perf_counter() - t0
    worst = max(abs(a - b) for a, b in zip(fast, slow))
    assert worst < 1e-9, f"results differ by {worst}"
    n = len(pairs)
    print(f"machine: {platform.processor() or platform.machine()}, {platform.python_version()}")
    print(f"brute force (scipy directed_hausdorff): {1000 * t_slow / n:8.1f} ms/pair")
    print(f"gitseg hausdorff_3d:                    {1000 * t_fast / n:8.1f} ms/pair")
    print(f"speed-up: {t_slow / t_fast:.1f}x  (max abs difference {worst:.1e})")


if __name__ == "__main__":
    main()
