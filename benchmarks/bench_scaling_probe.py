"""Issue 12, finding 1: does a case-day cost more to validate, or a training step more to feed, in
the full-size cache than in the 1/2 one, when nothing else runs? The rehearsal's search + refit grew
faster than linearly from 1/2 to full (validation +40% per case-day, training 17.9 -> 10.5-14.8
samples/s) with my tests running beside it; this measures the two parts alone.

    python benchmarks/bench_scaling_probe.py --caches runs/real_size/f0.5/cache runs/real_size/f1/cache \\
        --checkpoint runs/real_size/f1/search/rehearsal/refit_runs/refit-0-fold0/checkpoint_*/best.pt

1. Validation: the same checkpoint scored on fold 0's validation case-days of each cache
   (`train.score_fold`'s work, one process), prediction and metric timed apart, seconds per case-day.
2. Training: `gitseg.train.fit` of configs/rehearsal.yaml on each cache, one process, its 30 steps
   (samples/s as the epoch line reports it; validation switched off by a fold with no days is not
   possible, so the epoch's validation time is reported too).
Each cache is measured twice in the order A B A B, so a drift of the machine shows.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gitseg.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from gitseg.config import load_config  # noqa: E402
from gitseg.data.cache import Cache  # noqa: E402
from gitseg.data.uwmgi import CLASSES  # noqa: E402
from gitseg.infer import predict_volume, prepare_for_inference  # noqa: E402
from gitseg.metrics import volume_stats  # noqa: E402
from gitseg.train import fit  # noqa: E402


def validation(cache_dir: str, checkpoint: str, limit: int | None) -> dict:
    cache = Cache(cache_dir)
    state = load_checkpoint(checkpoint)
    cfg = load_config(None, [f"data.cache={cache_dir}"])
    data = state["config"]["data"]
    model = prepare_for_inference(model_from_checkpoint(state), cfg.train.channels_last)
    days = cache.case_days(folds=[0])[:limit]
    predict_s = metric_s = 0.0
    pixels = 0
    for case_day in days:
        entry = cache.entries[case_day]
        t = time.perf_counter()
        probs = predict_volume(model, cache.image(case_day), data["channels"], data["stride"],
                               out_size=(entry["height"], entry["width"]), tta="none", device=torch.device("cpu"),
                               amp=cfg.train.amp, channels_last=cfg.train.channels_last)
        predict_s += time.perf_counter() - t
        t = time.perf_counter()
        masks, gt = probs >= 0.5, cache.original_masks(case_day)
        for c in range(len(CLASSES)):
            volume_stats(masks[c], gt[c])
        metric_s += time.perf_counter() - t
        pixels += entry["slices"] * entry["height"] * entry["width"]
    n = len(days)
    return {"case_days": n, "predict_s_per_case_day": round(predict_s / n, 3),
            "metric_s_per_case_day": round(metric_s / n, 3), "mpixels_per_case_day": round(pixels / n / 1e6, 2)}


def training(cache_dir: str, out: Path) -> dict:
    cfg = load_config(ROOT / "configs" / "rehearsal.yaml", [f"data.cache={cache_dir}", f"out={out}"])
    lines = []
    fit(cfg, log=lines.append)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    m = metrics[-1]
    return {"samples_per_s": round(m["samples_per_s"], 2), "epoch_s": round(m["epoch_time"], 1),
            "val_s": round(m["val_time"], 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caches", nargs=2, required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--limit", type=int, default=20, help="validation case-days per cache")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(2):
            for i, cache in enumerate(args.caches):
                row = {"cache": cache, "repeat": repeat, **validation(cache, args.checkpoint, args.limit),
                       **training(cache, Path(tmp) / f"t{repeat}{i}")}
                print(json.dumps(row), flush=True)
                rows.append(row)
    for key in ("predict_s_per_case_day", "metric_s_per_case_day", "samples_per_s"):
        a = np.mean([r[key] for r in rows if r["cache"] == args.caches[0]])
        b = np.mean([r[key] for r in rows if r["cache"] == args.caches[1]])
        print(f"{key}: {a:.3f} -> {b:.3f} (x{b / a:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
