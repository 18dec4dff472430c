"""The distilled student against the ensemble it learned from (issue 16).

Runs `distill` (what `gitseg distill` runs) on the search folder and default ensemble of `bench_ensemble_gain.py` (16
cases, 6 held out: 18 holdout case-days), with the student config and pseudo-labels of the data
tree's test/ case-days, then prints the holdout table of four models with their latency, what the
teacher adds (student against the same student on labels alone, paired bootstrap over cases) and
the student's share of the ensemble's gain at its share of the latency. Protocol and results:
BENCHMARKS.md, "The distilled student".

    python benchmarks/bench_ensemble_gain.py            # once: the search, refit and ensemble
    python benchmarks/bench_distill.py [--run runs/bench_gain/search/demo] [--config configs/student_demo.yaml]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

from ensemble.distill.distill import distill
from gitseg.infer import cpu_has_native_bf16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/bench_gain/search/demo", help="search folder with its ensemble/")
    parser.add_argument("--config", default="configs/student_demo.yaml")
    parser.add_argument("--out", default=None, help="the student's folder (default RUN/ensemble-student)")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"commit {commit}; {platform.processor() or platform.machine()}; native bf16: {cpu_has_native_bf16()}")
    run = Path(args.run)
    out = Path(args.out) if args.out else run / "ensemble-student"
    started = time.perf_counter()
    result = distill(run / "ensemble", args.config, out=out, pseudo_labels="")  # "": the cache's own data root
    minutes = (time.perf_counter() - started) / 60
    print(f"\ngitseg distill: {minutes:.1f} min; holdout {len(result['holdout_case_days'])} case-days; "
          f"latency on {result['device']}")
    for r in result["models"]:
        print(f"  {r['model']:<22} TTA {r['tta']:<6} {r['ms_per_slice']:6.2f} ms ({r['latency_vs_ensemble']:.2f} x "
              f"ensemble)  holdout {r['score']:.4f}  over best single {r['gain_over_single']:+.4f} "
              f"[{r['gain_ci95_low']:+.4f}, {r['gain_ci95_high']:+.4f}]")
    t = result["teacher_adds"]
    print(f"what the teacher adds (student - labels only): {t['gain']:+.4f}, 95% [{t['ci95'][0]:+.4f}, "
          f"{t['ci95'][1]:+.4f}] over {t['cases']} cases; resamples with no gain {t['p_gain_not_positive']:.3f}")
    share = result["student_share_of_ensemble_gain"]
    share = "undefined (the ensemble adds nothing)" if share is None else f"{share:.0%}"
    print(f"student's share of the ensemble's gain: {share} at {result['latency_ratio']:.0%} of its latency")
    for name, oof in result["oof"].items():
        print(f"OOF {name}: {oof['at_0.5']:.4f} at 0.5, {oof['tuned']:.4f} tuned")
    (run / "bench_distill.json").write_text(json.dumps({"commit": commit, "minutes": minutes, **result}, indent=1))


if __name__ == "__main__":
    main()
