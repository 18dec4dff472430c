"""The volume cache (`gitseg prepare`): one normalised, resized array per case-day, packed masks,
case-grouped folds and a holdout, recorded in a manifest.

Layout of a cache folder:

    manifest.json                      sizes, folds, holdout, one entry per case-day
    volumes/<case_day>.image.npy       float16 (D, S, S), per-volume normalised to [0, 1]
    volumes/<case_day>.masks.npy       uint8 (3, D, S, ceil(S/8)): np.packbits of the resized masks
    volumes/<case_day>.orig.npy        uint8 (3, D, H, ceil(W/8)): packed masks at the original size
    volumes/<case_day>.json            the entry; written last, so it marks the arrays as complete

An entry of a NIfTI or DICOM source also holds its `origin` (the files it came from) and `affine`
(the LPS geometry of the stored volume, brought to the axial display) and `source_affine`.

An entry is reused when its key (cache format, size, the input files' names, sizes and mtimes, for
the Kaggle tree the case-day's RLE text) is unchanged, so re-running prepare on the same inputs does no work. New
entries are written under a staging folder and moved in only after every case-day succeeded (or
was skipped on request): a failed or interrupted run leaves nothing that a later run trusts.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from gitseg.data.sources import index_source, job_key
from gitseg.data.uwmgi import CLASSES, DataFormatError
from gitseg.files import folder_lock, load_array, write_text_atomic
from gitseg.progress import say

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
# Intensity scale: this percentile of the volume maps to 1.0. Robust to the 100x gain range
# between scans and to a few hot pixels.
NORM_PERCENTILE = 99.5


# ---------------------------------------------------------------------------------------------
# Preprocessing (also used at prediction time: one implementation)


def normalise_volume(image: np.ndarray) -> np.ndarray:
    """uint16 `(D, H, W)` → float32 in [0, 1], scaled by the volume's NORM_PERCENTILE."""
    sample = image[:, ::2, ::2]
    scale = float(np.percentile(sample, NORM_PERCENTILE))
    if scale <= 0:
        scale = float(image.max()) or 1.0
    return np.clip(image.astype(np.float32) / scale, 0.0, 1.0)


def _resize_stack(stack: np.ndarray, size: tuple[int, int], interpolation) -> np.ndarray:
    """Resize `(N, H, W)` slices to `size` `(h, w)`, one slice per call (INTER_AREA takes at most 4 channels)."""
    import cv2  # heavy: OpenCV loads only where images are resized

    return np.stack([cv2.resize(np.ascontiguousarray(s), (size[1], size[0]), interpolation=interpolation)
                     for s in stack])


def _resize_to_input(stack: np.ndarray, size: int) -> np.ndarray:
    """float `(N, H, W)` → `(N, size, size)`: area averaging when shrinking, bilinear when enlarging."""
    import cv2  # heavy: OpenCV loads only where images are resized

    shrink = size < max(stack.shape[1:])
    return _resize_stack(stack, (size, size), cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def window_indices(depth: int, channels: int, stride: int) -> np.ndarray:
    """Slice indices `(depth, channels)` of the 2.5D window around every slice, clamped to the volume (here, not
    in dataset.py, so that the ONNX runtime reads it without PyTorch)."""
    if channels < 1 or channels % 2 == 0:
        raise ValueError(f"2.5D channels must be odd and at least 1 (got {channels}): the window is centred on a slice")
    if stride < 1:
        raise ValueError(f"2.5D stride must be at least 1 (got {stride})")
    offsets = (np.arange(channels) - channels // 2) * stride
    return np.clip(np.arange(depth)[:, None] + offsets[None, :], 0, depth - 1)


def windows_per_forward(size: int, gpu: bool = False) -> int:
    """2.5D windows of `size` px per network forward (gitseg.infer.default_batch_size explains the CPU rule;
    here so that the ONNX runtime shares it without PyTorch)."""
    return 32 if gpu else max(4, min(32, (8 * 128 * 128) // (size * size)))


def preprocess_volume(image: np.ndarray, size: int) -> np.ndarray:
    """uint16 `(D, H, W)` scan → float16 `(D, size, size)` network input."""
    return _resize_to_input(normalise_volume(image), size).astype(np.float16)


def resize_probs(probs: np.ndarray, size: int) -> np.ndarray:
    """float `(C, D, H, W)` probabilities → float32 `(C, D, size, size)`, resized as the images are."""
    c, d, h, w = probs.shape
    return _resize_to_input(np.asarray(probs, dtype=np.float32).reshape(c * d, h, w), size).reshape(c, d, size, size)


def resize_masks(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """bool `(C, D, H, W)` → bool `(C, D, *size)` by nearest neighbour."""
    import cv2  # heavy: OpenCV loads only where images are resized

    c, d = masks.shape[:2]
    flat = masks.reshape(c * d, *masks.shape[2:]).view(np.uint8)
    return _resize_stack(flat, size, cv2.INTER_NEAREST).reshape(c, d, *size).astype(bool)


def pack_masks(masks: np.ndarray) -> np.ndarray:
    return np.packbits(masks, axis=-1)


def unpack_masks(packed: np.ndarray, width: int) -> np.ndarray:
    return np.unpackbits(packed, axis=-1, count=width).astype(bool)


# ---------------------------------------------------------------------------------------------
# Building the cache


def open_volume(path: Path, mmap: bool = True) -> np.ndarray:
    """A cache array (memory-mapped by default); a truncated or damaged file raises CorruptFileError."""
    return load_array(path, "run `gitseg prepare` again: it rebuilds damaged entries", mmap=mmap)


def _read_entry(volumes: Path, case_day: str) -> dict | None:
    """A complete cache entry, or None (missing, or a file of it truncated: it is rebuilt)."""
    path = volumes / f"{case_day}.json"
    try:
        entry = json.loads(path.read_text())
        for k in ("image", "masks", "orig"):
            open_volume(volumes / entry["files"][k])  # a header and size check, nothing read
    except (OSError, ValueError, KeyError):
        return None
    return entry


def _build_entry(case_day: str, job, size: int, key: str, staging: Path) -> dict:
    """Load, normalise, resize and write one case-day into `staging`; returns its entry."""
    volume, extra = job.load()
    image = preprocess_volume(volume.image, size)
    masks_small = resize_masks(volume.masks, (size, size))
    files = {"image": f"{case_day}.image.npy", "masks": f"{case_day}.masks.npy", "orig": f"{case_day}.orig.npy"}
    np.save(staging / files["image"], image)
    np.save(staging / files["masks"], pack_masks(masks_small))
    np.save(staging / files["orig"], pack_masks(volume.masks))
    entry = {
        "case_day": case_day,
        "case": job.case,
        "day": job.day,
        "slices": int(volume.image.shape[0]),
        "height": int(volume.image.shape[1]),
        "width": int(volume.image.shape[2]),
        "spacing": list(volume.spacing),
        "size": size,
        "key": key,
        "files": files,
        # per class: foreground voxels and slices with the organ (for stratified folds and summaries)
        "organ_voxels": [int(m.sum()) for m in volume.masks],
        "organ_slices": [int(m.any(axis=(1, 2)).sum()) for m in volume.masks],
        "empty_slices": int((~volume.masks.any(axis=(0, 2, 3))).sum()),
    }
    if job.origin is not None:  # a NIfTI or DICOM source: where the scan is, and its geometry
        entry["origin"] = job.origin
        entry.update(extra)
    return entry


def _build_job(args):
    case_day, job, size, key, staging = args
    try:
        return _build_entry(case_day, job, size, key, Path(staging)), []
    except DataFormatError as exc:
        return None, [f"{case_day}: {exc}" if case_day not in str(exc) else str(exc), *exc.problems]


def prepare(data_root, out, size: int = 256, folds: int = 5, holdout: float = 0.15, seed: int = 0,
            skip_bad: bool = False, workers: int | None = None, progress=None, log=say, fmt: str = "auto",
            labels: str | None = None, case_pattern: str | None = None, rois: str | None = None) -> dict:
    """Build (or update) the volume cache of the labelled case-days of a data set: a UWMGI root's
    train/ tree, an nnU-Net raw data set or a folder of DICOM patients with RT Structure Sets
    (gitseg/data/sources.py; `fmt` "auto" tells them apart).

    Returns the manifest. With skip_bad=False any bad file stops the run before anything is
    written into the cache; with skip_bad=True the affected case-days are left out and listed.
    """
    if size < 16:
        raise ValueError(f"size must be at least 16 px (got {size})")
    if folds < 2:
        raise ValueError(f"folds must be at least 2 (got {folds})")
    if not 0 <= holdout < 1:
        raise ValueError(f"holdout must be a fraction in [0, 1) (got {holdout})")
    out = Path(out)
    fmt, jobs, bad, loose = index_source(data_root, fmt, labels=labels, case_pattern=case_pattern, rois=rois)
    problems = [p for ps in bad.values() for p in ps] + loose
    if problems and not skip_bad:
        raise DataFormatError(
            f"{len(problems)} problem(s) in {data_root} across {len(bad)} case-day(s); fix them or pass "
            f"--skip-bad to leave those case-days out. Nothing was written.", problems)

    # A second prepare into this cache refuses, naming the first (it would delete the first's staging).
    with folder_lock(out, "gitseg prepare"):
        volumes = out / "volumes"
        volumes.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".staging-*"):  # left by a run that crashed (the lock rules out a live one)
            shutil.rmtree(stale, ignore_errors=True)

        entries: dict[str, dict] = {}
        todo = []
        for case_day, job in jobs.items():
            key = job_key(job, [CACHE_FORMAT, size, NORM_PERCENTILE])
            entry = _read_entry(volumes, case_day)
            if entry is not None and entry["key"] == key:
                entries[case_day] = entry
            else:
                todo.append((case_day, job, key))
        log(f"prepare: {len(jobs)} case-days ({fmt}), {len(entries)} cached, {len(todo)} to build"
            + (f", {len(bad) or len(loose)} skipped for bad files" if problems else ""))

        staging = out / f".staging-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            built = _run_jobs([(cd, job, size, key, str(staging)) for cd, job, key in todo], workers, progress)
            failed = {}
            for (case_day, _, _), (entry, errors) in zip(todo, built):
                if entry is None:
                    failed[case_day] = errors
                else:
                    entries[case_day] = entry
            if failed and not skip_bad:
                flat = [p for errs in failed.values() for p in errs]
                raise DataFormatError(
                    f"{len(failed)} case-day(s) failed to decode; fix them or pass --skip-bad. "
                    f"Nothing was written.", flat)
            bad.update(failed)
            # Commit: arrays first, the entry json last (it is what marks an entry as complete).
            for case_day, _, _ in todo:
                if case_day in failed:
                    continue
                entry = entries[case_day]
                for name in entry["files"].values():
                    os.replace(staging / name, volumes / name)
                _write_json_atomic(volumes / f"{case_day}.json", entry)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

        if not entries:
            raise DataFormatError(f"no usable case-day in {data_root}", problems)
        manifest = build_manifest(list(entries.values()), data_root, size, folds, holdout, seed)
        manifest["skipped"] = {cd: errs for cd, errs in sorted(bad.items())}
        manifest["unassigned_problems"] = loose
        _write_json_atomic(out / MANIFEST, manifest)
        if bad:
            log(f"prepare: skipped {len(bad)} case-day(s) with bad files: {', '.join(sorted(bad))}")
        return manifest


def _run_jobs(jobs: list, workers: int | None, progress) -> list:
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    results = []
    if workers <= 1 or len(jobs) <= 1:
        iterator = map(_build_job, jobs)
        pool = None
    else:
        pool = ProcessPoolExecutor(workers)
        iterator = pool.map(_build_job, jobs)
    try:
        for i, result in enumerate(iterator):
            results.append(result)
            if progress:
                progress(i + 1, len(jobs))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return results


def _write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=False))


# ---------------------------------------------------------------------------------------------
# Reading the cache


class Cache:
    """A prepared cache folder: its manifest and memory-mapped arrays."""

    def __init__(self, root):
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(
                f"no {MANIFEST} in {self.root}; build the cache with `gitseg prepare --data ROOT --out {self.root}`")
        self.manifest = json.loads(path.read_text())
        self.size = int(self.manifest["size"])
        self.entries = {e["case_day"]: e for e in self.manifest["entries"]}
        self._open: dict[str, tuple] = {}

    def case_days(self, folds=None, holdout: bool = False) -> list[str]:
        """Case-days of the given folds (all folds when None), or of the holdout."""
        if holdout:
            return [cd for cd, e in self.entries.items() if e["holdout"]]
        return [cd for cd, e in self.entries.items()
                if not e["holdout"] and (folds is None or e["fold"] in set(folds))]

    def _arrays(self, case_day: str):
        # Opened lazily per process: memmaps do not survive pickling into DataLoader workers.
        if case_day not in self._open:
            files = self.entries[case_day]["files"]
            self._open[case_day] = tuple(open_volume(self.root / "volumes" / files[k]) for k in ("image", "masks"))
        return self._open[case_day]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_open"] = {}
        return state

    def image(self, case_day: str) -> np.ndarray:
        """float16 `(D, S, S)` memmap."""
        return self._arrays(case_day)[0]

    def masks(self, case_day: str, z=None) -> np.ndarray:
        """bool `(3, D, S, S)`, or `(3, S, S)` for one slice z, at the cache size."""
        packed = self._arrays(case_day)[1]
        return unpack_masks(packed if z is None else packed[:, z], self.size)

    def original_masks(self, case_day: str) -> np.ndarray:
        """bool `(3, D, H, W)` at the original image size (for scoring at full resolution)."""
        e = self.entries[case_day]
        packed = open_volume(self.root / "volumes" / e["files"]["orig"], mmap=False)
        return unpack_masks(packed, e["width"])


# ---------------------------------------------------------------------------------------------
# Folds and holdout (per case, stored in the manifest, never recomputed downstream)


def case_content(entries: list[dict]) -> dict[int, np.ndarray]:
    """Per case: the fraction of its slices showing each organ, averaged over its days."""
    per_case: dict[int, list] = {}
    for e in entries:
        per_case.setdefault(e["case"], []).append(np.array(e["organ_slices"], dtype=float) / e["slices"])
    return {case: np.mean(v, axis=0) for case, v in per_case.items()}


def assign_splits(content: dict[int, np.ndarray], folds: int, holdout: float, seed: int) -> dict[int, int | None]:
    """case → fold in 0..folds-1, or None for the holdout; stratified by organ content.

    The holdout takes evenly spaced cases from the cases sorted by content. The rest are dealt
    greedily, richest first, each to the smallest fold whose organ totals it balances best.
    """
    cases = sorted(content)
    n_hold = int(round(holdout * len(cases)))
    if holdout > 0 and n_hold == 0 and len(cases) > folds:
        n_hold = 1
    if len(cases) - n_hold < folds:
        raise ValueError(
            f"{len(cases)} cases cannot make {folds} folds plus a holdout of {n_hold}; lower --folds or "
            f"--holdout, or synthesize more cases (gitseg synth --cases N)")
    rng = np.random.default_rng(seed)
    order = [cases[i] for i in rng.permutation(len(cases))]
    order.sort(key=lambda c: -float(content[c].sum()))  # stable: ties stay in random order
    split: dict[int, int | None] = {}
    if n_hold:
        step = len(order) / n_hold
        offset = rng.uniform(0, step)
        for k in range(n_hold):
            split[order[int(offset + k * step)]] = None
    totals = np.zeros((folds, 3))
    counts = np.zeros(folds, dtype=int)
    for case in (c for c in order if c not in split):
        candidates = np.flatnonzero(counts == counts.min())
        cost = []
        for f in candidates:
            trial = totals.copy()
            trial[f] += content[case]
            cost.append(trial.std(axis=0).sum())
        best = int(candidates[int(np.argmin(cost))])
        split[case] = best
        totals[best] += content[case]
        counts[best] += 1
    return split


def build_manifest(entries: list[dict], data_root, size: int, folds: int, holdout: float, seed: int) -> dict:
    split = assign_splits(case_content(entries), folds, holdout, seed)
    ordered = sorted(entries, key=lambda e: (e["case"], e["day"]))
    for e in ordered:
        e["fold"] = split[e["case"]]
        e["holdout"] = split[e["case"]] is None
    return {
        "format": CACHE_FORMAT,
        "source": str(Path(data_root).resolve()),
        "size": size,
        "classes": list(CLASSES),
        "folds": folds,
        "holdout_fraction": holdout,
        "seed": seed,
        "normalisation": f"per volume: divide by the {NORM_PERCENTILE} percentile, clip to [0, 1]",
        "entries": ordered,
    }


# ---------------------------------------------------------------------------------------------
# Summary


def split_summary(manifest: dict) -> list[dict]:
    """One row per split (each fold, the holdout, all): case-days, slices, empty share, class shares."""
    groups: dict[str, list[dict]] = {}
    for e in manifest["entries"]:
        name = "holdout" if e["holdout"] else f"fold {e['fold']}"
        groups.setdefault(name, []).append(e)
    groups = dict(sorted(groups.items(), key=lambda kv: (kv[0] == "holdout", kv[0])))
    groups["all"] = manifest["entries"]
    rows = []
    for name, entries in groups.items():
        slices = sum(e["slices"] for e in entries)
        row = {"split": name, "cases": len({e["case"] for e in entries}), "case_days": len(entries),
               "slices": slices,
               "sizes": " ".join(sorted({f"{e['width']}x{e['height']}" for e in entries})),
               "empty": sum(e["empty_slices"] for e in entries) / slices}
        for c, cls in enumerate(manifest["classes"]):
            row[cls] = sum(e["organ_slices"][c] for e in entries) / slices
        rows.append(row)
    return rows
