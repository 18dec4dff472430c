"""The first prediction: one 144-slice case-day through `gitseg predict --dicom`, start to end.

Cold: a fresh `python -m gitseg predict --dicom ...` process each run, as a user starts it (the
files are in the page cache after the first run: cold means a new process, not a cold disk). Its
wall time, timed by this script around the process, splits into what `timings.json` says (read,
networks, inference, writing) and the rest: the interpreter, the imports and loading the
ensemble's manifest. Start-up is everything before the series' pixels reach the networks other
than reading the series: wall - read - inference - writing.

Warm: `predict_series` called again in a process that has already predicted once (imports done;
each call still loads the ensemble and prepares its networks, as the command does).

Baseline: `--baseline DIR`, a checkout of an earlier commit, run the same way in the same run
(PYTHONPATH=DIR, alternating with this tree's runs); an earlier ensemble folder loads in both.
Its `timings.json` has no networks figure (they were built inside inference), so its start-up
is not split out; its wall time is.

    python benchmarks/bench_predict_start.py --ensemble runs/demo/search/demo/ensemble \
        [--baseline /tmp/base] [--repeats 5] [--out runs/bench_predict_start]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("read_s", "models_s", "inference_s", "write_s")


def make_series(out: Path, slices: int, size: int) -> Path:
    """One synthetic unlabelled case-day of `slices` slices at `size` px, written as a DICOM series."""
    from gitseg.data.dicom import write_dicom_tree
    from gitseg.data.synth import write_dataset

    write_dataset(out, cases=1, days=1, slices=slices, size=size, seed=1, test_cases=1, overwrite=True)
    (folder,) = write_dicom_tree(out, "test", seed=1)
    return folder


def cold_run(code: Path, ensemble: Path, series: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(code)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "gitseg", "predict", "--ensemble", str(ensemble), "--dicom",
                           str(series), "--out", str(out)], cwd=code, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"predict failed in {code}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    timings = json.loads((out / "timings.json").read_text())
    row = {"wall_s": wall, **{k: timings.get(k) for k in PARTS}}
    if row["models_s"] is not None:
        row["startup_s"] = wall - row["read_s"] - row["inference_s"] - row["write_s"]
    return row


def warm_runs(ensemble: Path, series: Path, out: Path, repeats: int) -> list[dict]:
    from ensemble.predict.clinical import predict_series

    quiet = dict(log=lambda *_: None)
    predict_series(ensemble, out / "first", dicom=series, **quiet)
    rows = []
    for i in range(repeats):
        start = time.perf_counter()
        timings = predict_series(ensemble, out / f"warm{i}", dicom=series, **quiet)
        rows.append({"wall_s": time.perf_counter() - start, **{k: timings[k] for k in PARTS}})
    return rows


def median_row(name: str, rows: list[dict]) -> dict:
    keys = [k for k in ("wall_s", "startup_s", *PARTS) if all(r.get(k) is not None for r in rows)]
    return {"arm": name, "runs": len(rows), **{k: statistics.median(r[k] for r in rows) for k in keys}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ensemble", default="runs/demo/search/demo/ensemble")
    parser.add_argument("--baseline", default=None, help="a checkout of an earlier commit, run the same way")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--slices", type=int, default=144)
    parser.add_argument("--size", type=int, default=128, help="the series' longer side (the demo's data: 128 px)")
    parser.add_argument("--out", default="runs/bench_predict_start")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    ensemble = Path(args.ensemble).resolve()
    series = make_series(out / "data", args.slices, args.size)
    print(f"bench_predict_start: {args.slices}-slice series at {args.size} px, ensemble {ensemble}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")

    arms = {"gitseg": ROOT} | ({"baseline": Path(args.baseline).resolve()} if args.baseline else {})
    cold: dict[str, list[dict]] = {name: [] for name in arms}
    for i in range(args.repeats):  # alternating, so that a slower spell of the machine hits both arms
        for name, code in arms.items():
            cold[name].append(cold_run(code, ensemble, series, out / f"{name}-cold{i}"))
    rows = [median_row(f"{name} cold", r) for name, r in cold.items()]
    rows.append(median_row("gitseg warm", warm_runs(ensemble, series, out, args.repeats)))

    from gitseg.tables import format_table

    print(format_table([{k: r.get(k, "") for k in ("arm", "runs", "wall_s", "startup_s", *PARTS)} for r in rows],
                       floats="{:.2f}"))
    if args.baseline:
        print(f"cold wall time, gitseg / baseline: {rows[0]['wall_s'] / rows[1]['wall_s']:.2f}x")
    (out / "bench_predict_start.json").write_text(json.dumps({"rows": rows, "cold": cold}, indent=1))


if __name__ == "__main__":
    main()
