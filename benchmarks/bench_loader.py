"""2.5D samples per second: gitseg's cache vs decoding PNGs per sample as public notebooks do.

Baseline (the common public 2.5D notebook loader): for each sample read the `channels` PNGs with
cv2.imread, scale each by the volume maximum, resize to the input size, decode the three RLE
strings of the centre slice from the train.csv table and resize the masks. gitseg: the same
sample from the memory-mapped float16 cache and packed masks. Same data, same input size, same
random sample order, one process each; no augmentation in either.

    python benchmarks/bench_loader.py [--samples 600] [--size 256]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from gitseg.data.cache import Cache, prepare
from gitseg.data.dataset import SliceDataset, window_indices
from gitseg.data.synth import write_dataset
from gitseg.data.uwmgi import CLASSES, index_root, rle_decode


class NotebookDataset:
    """Decode-per-sample loader in the style of the public notebooks."""

    def __init__(self, root, channels, stride, size):
        self.slices, _ = index_root(root)
        self.channels, self.stride, self.size = channels, stride, size
        self.groups = {cd: g.reset_index(drop=True) for cd, g in self.slices.groupby("case_day", sort=False)}
        self.items = [(cd, z) for cd, g in self.groups.items() for z in range(len(g))]
        # notebooks precompute the volume max once per case-day (from a csv); so do we
        self.vmax = {cd: max(cv2.imread(p, cv2.IMREAD_UNCHANGED).max() for p in g["path"])
                     for cd, g in self.groups.items()}

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        case_day, z = self.items[index]
        rows = self.groups[case_day]
        window = window_indices(len(rows), self.channels, self.stride)[z]
        image = np.stack([
            cv2.resize(cv2.imread(rows["path"][k], cv2.IMREAD_UNCHANGED).astype(np.float32) / self.vmax[case_day],
                       (self.size, self.size), interpolation=cv2.INTER_AREA)
            for k in window])
        h, w = int(rows["height"][z]), int(rows["width"][z])
        masks = np.stack([cv2.resize(rle_decode(rows[c][z], (h, w)).astype(np.uint8), (self.size, self.size),
                                     interpolation=cv2.INTER_NEAREST) for c in CLASSES])
        return image, masks.astype(np.float32)


def rate(dataset, order) -> float:
    dataset[order[0]]
    start = time.perf_counter()
    for i in order:
        dataset[i]
    return len(order) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--channels", type=int, default=5)
    parser.add_argument("--stride", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "data", Path(tmp) / "cache"
        write_dataset(root, cases=2, days=2, seed=0, test_cases=0)  # real sizes (266^2, 360x310, ...)
        prepare(root, out, size=args.size, folds=2, holdout=0.0, log=lambda *_: None)
        cache = Cache(out)
        ours = SliceDataset(cache, cache.case_days(), channels=args.channels, stride=args.stride)
        base = NotebookDataset(root, args.channels, args.stride, args.size)
        assert len(ours) == len(base)
        order = np.random.default_rng(0).integers(0, len(ours), args.samples)
        r_base, r_ours = rate(base, order), rate(ours, order)
    print(f"machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}")
    print(f"{args.samples} random 2.5D samples, {args.channels} channels stride {args.stride}, {args.size} px")
    print(f"notebook loader (PNG decode per sample): {r_base:8.0f} samples/s")
    print(f"gitseg cache (memmap float16 + packed):  {r_ours:8.0f} samples/s")
    print(f"speed-up: {r_ours / r_base:.1f}x")


if __name__ == "__main__":
    main()
