"""What the ensemble adds, with an interval, and what a latency budget buys (issue 16).

Runs the demo pipeline (`gitseg.demo.run_demo`: the same search, refit and ensemble) on a larger
embedded data set with a larger holdout, so that the paired bootstrap over holdout cases has more
than two cases to resample. Then builds one more ensemble from the same search folder per latency
budget (a share of the cost of the default top-k ensemble, measured in the same run) and scores
each on the same holdout. Protocol and results: BENCHMARKS.md, "Ensembles that earn their place".

    python benchmarks/bench_ensemble_gain.py [--out runs/bench_gain] [--cases 16] [--holdout 0.35]
    python benchmarks/bench_ensemble_gain.py --budgets-only   # again on the same search and ensemble
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

from ensemble.selection.build import build_ensemble
from gitseg.demo import DATA, run_demo
from gitseg.infer import cpu_has_native_bf16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench_gain")
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--holdout", type=float, default=0.35)
    parser.add_argument("--anatomy", default="schematic", choices=("schematic", "realistic"),
                        help="the synthetic phantom (gitseg synth --anatomy; docs/phantom.md)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5],
                        help="latency budgets as shares of the default ensemble's measured ms per slice")
    parser.add_argument("--budgets-only", action="store_true",
                        help="reuse --out's search and default ensemble; build the budget ensembles again")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"commit {commit}; {platform.processor() or platform.machine()}; native bf16: {cpu_has_native_bf16()}")
    started = time.perf_counter()
    if args.budgets_only:
        run_dir = Path(args.out) / "search" / "demo"
        headline = json.loads((run_dir / "demo.json").read_text())
    else:
        headline = run_demo(out=args.out, data={**DATA, "cases": args.cases, "anatomy": args.anatomy},
                            holdout=args.holdout)
        run_dir = Path(headline["ensemble"]).parent
    manifest = json.loads((run_dir / "ensemble" / "ensemble.json").read_text())
    holdout = manifest["scores"]["holdout"]
    print(f"\nholdout: {len(holdout['case_days'])} case-days")
    for r in holdout["ablation"]:
        print(f"  {r['variant']:<58} {r['tta']:<6} {r['score']:.4f}  gain {r['gain']:+.4f} over {r['gain_over']}")
    gain = holdout["ensemble_gain"]
    print(f"what the ensemble adds: {gain['gain']:+.4f}, 95% [{gain['ci95'][0]:+.4f}, {gain['ci95'][1]:+.4f}] "
          f"over {gain['cases']} cases; resamples with no gain {gain['p_gain_not_positive']:.3f}")
    lat = manifest["latency"]
    full_ms = lat["ensemble_ms_per_slice"]
    print(f"\nlatency on {lat['device']}: default ensemble {full_ms:.2f} ms per slice, "
          f"OOF {lat['ensemble_oof_score']:.4f}")
    for c in sorted((c for c in lat["candidates"] if c["on_front"]), key=lambda c: c["ms_per_slice"]):
        print(f"  front: {'+'.join(c['configurations'])} x{c['folds']} TTA {c['tta']}: OOF {c['oof_score']:.4f}, "
              f"{c['ms_per_slice']:.2f} ms")
    budgets = []
    for share in args.budgets:
        budget = share * full_ms
        m = build_ensemble(run_dir, out=run_dir / f"ensemble_budget_{share:g}", latency_budget=budget)
        h = m.scores.holdout
        row = {"share": share, "budget_ms": budget, "chosen": m.selection.why, "members": len(m.members), "tta": m.tta,
               "ms_per_slice": m.latency.ensemble_ms_per_slice, "oof": m.latency.ensemble_oof_score,
               "holdout": h.score, "holdout_variant": h.final}
        budgets.append(row)
        print(f"budget {budget:.2f} ms ({share:g} x default): {row['members']} members, TTA {row['tta']}, "
              f"{row['ms_per_slice']:.2f} ms, OOF {row['oof']:.4f}, holdout {row['holdout']:.4f}")
    result = {"commit": commit, "headline": headline, "ablation": holdout["ablation"], "ensemble_gain": gain,
              "latency": {k: v for k, v in lat.items() if k != "candidates"}, "budgets": budgets,
              "elapsed_s": time.perf_counter() - started}
    name = "bench_gain_budgets.json" if args.budgets_only else "bench_gain.json"
    (Path(args.out) / name).write_text(json.dumps(result, indent=1, default=str))
    print(f"\nwrote {Path(args.out) / name} in {result['elapsed_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
