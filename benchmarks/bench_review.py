"""What the review list costs at prediction time (issue 35): `predict_scan` with the members' votes
(as `gitseg predict` runs it for an ensemble of two or more networks) against the same call without
them (the baseline, what predict did before), on the same engine and case-days, in one process.

    python benchmarks/bench_review.py --ensemble runs/demo/search/demo/ensemble --data runs/demo/data

Each case-day of `--split` (up to `--case-days`): one warm-up call, then `--repeats` calls of each
variant alternately; the median per variant. Prints seconds per case-day, slices per second, the
ratio (with / without), and checks that the masks are the same. Protocol and results: BENCHMARKS.md,
"The review list".
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from ensemble.deploy.runtime import load_engine
from ensemble.predict.review import case_day_review, votes_for
from gitseg.data.uwmgi import index_root, volume_from_rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ensemble", required=True)
    p.add_argument("--data", required=True, help="a UWMGI tree")
    p.add_argument("--split", default="test")
    p.add_argument("--case-days", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--runtime", default="auto")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()

    engine = load_engine(args.ensemble, runtime=args.runtime)
    engine.load_networks()
    if votes_for(engine, (1, 1, 1)) is None:
        raise SystemExit(f"{args.ensemble} has one network: it has no review list to time")
    slices, _ = index_root(args.data, args.split)
    case_days = list(dict.fromkeys(slices["case_day"]))[: args.case_days]
    rows = []
    for case_day in case_days:
        volume = volume_from_rows(slices[slices["case_day"] == case_day])
        image = volume.image
        engine.predict_scan(image)  # warm-up
        plain, voted = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            _, masks_plain = engine.predict_scan(image)
            plain.append(time.perf_counter() - start)
            start = time.perf_counter()
            votes = votes_for(engine, image.shape)
            _, masks_voted = engine.predict_scan(image, votes=votes)
            review = case_day_review(votes.counts, votes.members, volume.spacing)
            voted.append(time.perf_counter() - start)
        if not np.array_equal(masks_plain, masks_voted):
            raise SystemExit(f"{case_day}: the masks differ with the votes on: the review must not change them")
        a, b = statistics.median(plain), statistics.median(voted)
        rows.append({"case_day": case_day, "slices": int(image.shape[0]), "size": list(image.shape[1:]),
                     "without_s": a, "with_s": b, "ratio": b / a, "disagreement": review["disagreement"]})
        print(f"{case_day}: {image.shape[0]} slices of {image.shape[1]} x {image.shape[2]}: without the votes "
              f"{a:.2f} s ({image.shape[0] / a:.1f} slices/s), with them {b:.2f} s ({image.shape[0] / b:.1f} "
              f"slices/s): ratio {b / a:.3f}; disagreement {review['disagreement']:.3f}", flush=True)
    total_a, total_b = sum(r["without_s"] for r in rows), sum(r["with_s"] for r in rows)
    print(f"all {len(rows)} case-days: ratio {total_b / total_a:.3f} (with / without the votes), "
          f"{len(engine.members)} members, engine {type(engine).__name__}, "
          f"{platform.processor() or platform.machine()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "ratio": total_b / total_a,
                                               "members": len(engine.members)}, indent=1))


if __name__ == "__main__":
    main()
