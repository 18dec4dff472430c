"""`gitseg robustness`: the holdout scored under MRI corruptions, each at three severities.

Each holdout case-day's raw scan (read from the tree the cache was prepared from, at its original
size) is scaled so that its 99.5th percentile is 1, corrupted, and predicted by the ensemble as
any scan is (the same normalisation, resizing, TTA and post-processing), then scored against its
labels with the competition metric. Corruptions come from TorchIO, seeded per case-day, with fixed
amounts (a range of one value) so that a severity means one thing:

    bias_field       smooth multiplicative field (TorchIO RandomBiasField, coefficients)
    gaussian_noise   additive noise, std as a share of the scan's 99.5th percentile
    rician_noise     the magnitude of a complex signal with Gaussian noise (MRI's noise floor)
    motion           rigid motion during the acquisition (RandomMotion, degrees and mm)
    ghosting         ghosts along the phase-encoding direction (RandomGhosting, intensity)
    spike            a k-space spike: stripes (RandomSpike, intensity)
    blur             Gaussian blur, std in mm (RandomBlur)
    lower_resolution in-plane downsampling and back (RandomAnisotropy, factor)
    gamma            contrast change, x ** exp(log_gamma) (RandomGamma)

What it writes (default `<ensemble>/robustness/`): robustness.json and robustness.csv (score,
Dice, Hausdorff per corruption and severity; the drop from the clean score with a 95% paired
bootstrap interval over cases; the worst-hit class; the scores per image size and spacing
group, a stand-in for scanners) and figures/robustness.png (score against severity).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ensemble import figures
from ensemble.evaluate import paired_gain, scores_from_rows
from ensemble.model import EnsembleModel
from gitseg.data.cache import NORM_PERCENTILE, Cache
from gitseg.data.uwmgi import CLASSES, index_root, volume_from_rows
from gitseg.files import staged_folder, write_text_atomic
from gitseg.metrics import ScoreSums
from gitseg.progress import bar, say
from gitseg.tables import csv_text

CLEAN = "clean"
# Amounts per severity 1, 2, 3 (each the single value of TorchIO's range).
SEVERITIES = {
    "bias_field": (0.2, 0.4, 0.8),
    "gaussian_noise": (0.02, 0.05, 0.10),
    "rician_noise": (0.02, 0.05, 0.10),
    "motion": (2.0, 5.0, 10.0),          # degrees and mm alike
    "ghosting": (0.3, 0.6, 1.0),
    "spike": (0.5, 1.0, 2.0),
    "blur": (0.5, 1.0, 2.0),
    "lower_resolution": (2.0, 3.0, 4.0),
    "gamma": (0.15, 0.3, 0.5),
}
CORRUPTIONS = tuple(SEVERITIES)


def _transform(name: str, amount: float):
    import torchio as tio  # heavy: only the robustness report needs TorchIO

    fixed = (amount, amount)
    # The spatial axes of the tensors below are (column, row, slice): in-plane is 0 and 1.
    return {
        "bias_field": lambda: tio.RandomBiasField(coefficients=fixed),
        "gaussian_noise": lambda: tio.RandomNoise(mean=0.0, std=fixed),
        "motion": lambda: tio.RandomMotion(degrees=fixed, translation=fixed, num_transforms=2),
        "ghosting": lambda: tio.RandomGhosting(num_ghosts=(4, 4), axes=(1,), intensity=fixed),
        "spike": lambda: tio.RandomSpike(num_spikes=(1, 1), intensity=fixed),
        "blur": lambda: tio.RandomBlur(std=fixed),
        "lower_resolution": lambda: tio.RandomAnisotropy(axes=(0,), downsampling=fixed),
        "gamma": lambda: tio.RandomGamma(log_gamma=fixed),
    }[name]()


def corrupt(scan: np.ndarray, spacing, name: str, severity: int, seed: int) -> np.ndarray:
    """float32 `(D, H, W)` scan corrupted by `name` at `severity` (1-3), after scaling its 99.5th
    percentile to 1; the same inputs give the same output."""
    import torchio as tio  # heavy: only the robustness report needs TorchIO

    scale = float(np.percentile(scan[:, ::2, ::2], NORM_PERCENTILE)) or 1.0
    volume = np.asarray(scan, np.float32) / scale
    amount = SEVERITIES[name][severity - 1]
    torch.manual_seed(seed)
    if name == "rician_noise":  # TorchIO has Gaussian noise only: the magnitude of a complex signal
        rng = np.random.default_rng(seed)
        real = volume + rng.normal(0, amount, volume.shape)
        return np.sqrt(real ** 2 + rng.normal(0, amount, volume.shape) ** 2).astype(np.float32)
    thickness, row_mm, col_mm = spacing
    image = tio.ScalarImage(tensor=torch.from_numpy(np.ascontiguousarray(volume.transpose(2, 1, 0)))[None],
                            affine=np.diag([col_mm, row_mm, thickness, 1.0]))
    out = _transform(name, amount)(image).data[0].numpy().transpose(2, 1, 0)
    return np.clip(out, 0, None).astype(np.float32)  # magnitude images: no negative intensities


def _rows(masks: np.ndarray, gt: np.ndarray, entry: dict) -> list[dict]:
    return [{"case_day": entry["case_day"], "case": entry["case"], "class": cls,
             "sums": list(ScoreSums.of_volume(masks[c], gt[c]))} for c, cls in enumerate(CLASSES)]


def group_of(entry: dict) -> str:
    """The image size and pixel spacing of a case-day: a stand-in for the scanner and protocol."""
    return f"{entry['height']}x{entry['width']} px @ {entry['spacing'][1]:.2f} mm"


def run_robustness(ensemble_dir, cache_dir=None, out=None, corruptions=CORRUPTIONS, severities=(1, 2, 3),
                   data_root=None, seed: int = 0, log=say) -> dict:
    """Score the holdout of `cache_dir` (default: the ensemble's) clean and under each corruption and
    severity; writes `out` (default `<ensemble>/robustness`) and returns robustness.json's content."""
    started = time.perf_counter()
    unknown = [c for c in corruptions if c not in SEVERITIES]
    if unknown:
        raise ValueError(f"unknown corruption(s) {unknown}; choose from {', '.join(CORRUPTIONS)}")
    if not set(severities) <= {1, 2, 3}:
        raise ValueError(f"severities are 1, 2 and 3 (got {list(severities)})")
    model = EnsembleModel.load(ensemble_dir)
    manifest = json.loads((Path(ensemble_dir) / "ensemble.json").read_text())
    cache = Cache(cache_dir or manifest["source"]["cache"])
    holdout = cache.case_days(holdout=True)
    if not holdout:
        raise ValueError(f"the cache {cache.root} has no holdout case-days; prepare it with --holdout > 0")
    root = Path(data_root or cache.manifest["source"])
    slices, problems = index_root(root, "train", case_days=holdout)
    missing = sorted(set(holdout) - set(slices["case_day"]))
    if missing or problems:
        raise FileNotFoundError(f"the raw scans of the holdout are not readable in {root} ({(problems or missing)[0]}"
                                f"); pass --data with the UWMGI root the cache was prepared from")
    variants = [(CLEAN, 0)] + [(c, s) for c in corruptions for s in severities]
    rows: dict[tuple, list] = {v: [] for v in variants}
    progress = bar(len(holdout) * len(variants), "robustness", unit="volume")
    for i, case_day in enumerate(holdout):
        entry = cache.entries[case_day]
        volume = volume_from_rows(slices[slices["case_day"] == case_day])
        gt = cache.original_masks(case_day)
        for name, severity in variants:
            scan = volume.image if name == CLEAN else corrupt(volume.image, entry["spacing"], name, severity,
                                                               seed + 1000 * i)
            _, masks = model.predict_scan(scan)
            rows[(name, severity)] += _rows(masks, gt, entry)
            progress.update()
    progress.close()

    clean = scores_from_rows(rows[(CLEAN, 0)])
    groups = sorted({group_of(cache.entries[cd]) for cd in holdout})
    table = []
    for name, severity in variants:
        r = rows[(name, severity)]
        s = scores_from_rows(r)
        row = {"corruption": name, "severity": severity,
               "amount": SEVERITIES[name][severity - 1] if name != CLEAN else 0.0,
               "score": s["score"], "dice": s["dice"], "hausdorff": s["hausdorff"]}
        if name != CLEAN:
            drop = paired_gain(r, rows[(CLEAN, 0)], seed=seed)
            per_class = {cls: s[f"score/{cls}"] - clean[f"score/{cls}"] for cls in CLASSES}
            worst = min(per_class, key=per_class.get)
            row.update({"drop": drop["gain"], "drop_ci95_low": drop["ci95"][0], "drop_ci95_high": drop["ci95"][1],
                        "worst_class": worst, "worst_class_drop": per_class[worst]})
        for cls in CLASSES:
            row[f"score/{cls}"] = s[f"score/{cls}"]
        for group in groups:
            part = [x for x in r if group_of(cache.entries[x["case_day"]]) == group]
            row[f"score [{group}]"] = scores_from_rows(part)["score"]
        table.append(row)
    result = {"ensemble": str(Path(ensemble_dir).resolve()), "cache": str(cache.root.resolve()),
              "holdout_case_days": holdout, "cases": len({cache.entries[cd]["case"] for cd in holdout}),
              "seed": seed, "severities": {c: SEVERITIES[c] for c in corruptions}, "groups": groups,
              "clean_score": clean["score"], "table": table, "time_s": time.perf_counter() - started}
    out = Path(out) if out is not None else Path(ensemble_dir) / "robustness"
    with staged_folder(out) as staging:
        write_text_atomic(staging / "robustness.json", json.dumps(result, indent=1, default=float))
        write_text_atomic(staging / "robustness.csv", csv_text(table))
        (staging / "figures").mkdir()
        fig = figures.robustness(table, clean["score"])
        fig.savefig(staging / "figures" / "robustness.png", dpi=110)
    worst = min((r for r in table if r["corruption"] != CLEAN), key=lambda r: r["score"], default=None)
    log(f"robustness: clean holdout score {clean['score']:.4f} on {len(holdout)} case-days"
        + (f"; worst: {worst['corruption']} at severity {worst['severity']}, {worst['score']:.4f} "
           f"({worst['drop']:+.4f}, most in {worst['worst_class']})" if worst else "") + f"; wrote {out}")
    return result
