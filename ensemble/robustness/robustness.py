"""`gitseg robustness`: the holdout scored under MRI corruptions, each at three severities.

Each holdout case-day's raw scan (read from the tree the cache was prepared from, at its original
size) is scaled so that its 99.5th percentile is 1, corrupted, and predicted by the ensemble as
any scan is (the same normalisation, resizing, TTA and post-processing), then scored against its
labels with the competition metric. The corruptions and their amounts per severity are
gitseg.data.artefacts' (the same ones `data.artefacts` trains with), seeded per case-day.

What it writes (default `<ensemble>/robustness/`): robustness.json and robustness.csv (score,
Dice, Hausdorff per corruption and severity; the drop from the clean score with a 95% paired
bootstrap interval over cases; the worst-hit class; the scores per image size and spacing
group, a stand-in for scanners) and figures/robustness.png (score against severity).
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import numpy as np

from ensemble.model import EnsembleModel
from ensemble.report import figures
from ensemble.selection.evaluate import paired_gain, scores_from_rows
from gitseg import records
from gitseg.data.artefacts import ARTEFACTS, SEVERITIES, check_names, corrupt
from gitseg.data.cache import NORM_PERCENTILE, Cache
from gitseg.data.sources import source_volumes
from gitseg.data.uwmgi import CLASSES
from gitseg.files import staged_folder, write_text_atomic
from gitseg.metrics import ScoreSums
from gitseg.progress import bar, say
from gitseg.records import ENSEMBLE_MANIFEST, EnsembleManifest
from gitseg.tables import csv_text, format_table

CLEAN = "clean"
CORRUPTIONS = ARTEFACTS


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
    check_names(corruptions)
    if not set(severities) <= {1, 2, 3}:
        raise ValueError(f"severities are 1, 2 and 3 (got {list(severities)})")
    model = EnsembleModel.load(ensemble_dir)
    manifest = records.load(EnsembleManifest, Path(ensemble_dir) / ENSEMBLE_MANIFEST)  # checked by load above
    cache = Cache(cache_dir or manifest.source.cache)
    holdout = cache.case_days(holdout=True)
    if not holdout:
        raise ValueError(f"the cache {cache.root} has no holdout case-days; prepare it with --holdout > 0")
    root = Path(data_root or cache.manifest["source"])
    try:
        scans = source_volumes({**cache.manifest, "source": str(root)}, [cache.entries[cd] for cd in holdout])
        first = next(scans)  # the source is checked here, before any prediction
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc}; pass --data with the data set the cache was prepared from") from None
    variants = [(CLEAN, 0)] + [(c, s) for c in corruptions for s in severities]
    rows: dict[tuple, list] = {v: [] for v in variants}
    progress = bar(len(holdout) * len(variants), "robustness", unit="volume")
    for i, (entry, image, _) in enumerate(itertools.chain([first], scans)):
        case_day = entry["case_day"]
        gt = cache.original_masks(case_day)
        for name, severity in variants:
            scan = image if name == CLEAN else corrupt(image, entry["spacing"], name, severity, seed + 1000 * i,
                                                       NORM_PERCENTILE)
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
            row.update({"drop": drop.gain, "drop_ci95_low": drop.ci95[0], "drop_ci95_high": drop.ci95[1],
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
              "clean_score": clean["score"], "table": table, "time_s": time.perf_counter() - started,
              # per-volume score sums of every variant, for comparisons across models (bench_artefacts.py)
              "rows": {f"{name}/{severity}": r for (name, severity), r in rows.items()}}
    out = Path(out) if out is not None else Path(ensemble_dir) / "robustness"
    with staged_folder(out) as staging:
        write_text_atomic(staging / "robustness.json", json.dumps(result, default=float))
        write_text_atomic(staging / "robustness.csv", csv_text(table))
        (staging / "figures").mkdir()
        fig = figures.robustness(table, clean["score"])
        fig.savefig(staging / "figures" / "robustness.png", dpi=110)
    worst = min((r for r in table if r["corruption"] != CLEAN), key=lambda r: r["score"], default=None)
    log(f"robustness: clean holdout score {clean['score']:.4f} on {len(holdout)} case-days"
        + (f"; worst: {worst['corruption']} at severity {worst['severity']}, {worst['score']:.4f} "
           f"({worst['drop']:+.4f}, most in {worst['worst_class']})" if worst else "") + f"; wrote {out}")
    return result


def table_text(result: dict) -> str:
    """The robustness table as the terminal shows it."""
    return format_table([{k: r.get(k, "") for k in ("corruption", "severity", "amount", "score", "drop",
                                                    "drop_ci95_low", "drop_ci95_high", "worst_class")}
                         for r in result["table"]], floats="{:.4f}")
