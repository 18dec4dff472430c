"""The real-size rehearsal (issue 12, `make rehearsal`): the whole pipeline on a synthetic tree with
the real data's shape, each stage measured.

    python benchmarks/real_size.py [--out runs/real_size] [--fractions 0.125 0.25 0.5 1]
                                   [--stages prepare search topk greedy report predict]

`--stages` runs some stages and keeps the others' outputs and figures from an earlier rehearsal in
`--out` (to finish a rehearsal that stopped, or to repeat one stage alone); each row records the
commit it ran at.

1. `gitseg synth --profile uwmgi` once (274 case-days, 38,496 slices at 234-360 px, 50 test cases).
2. For each fraction of the case-days (whole cases, the same seed-fixed order, so each fraction
   holds the smaller ones): a tree of links to those cases, then as separate `gitseg` processes
   `prepare` at 320 px (and again, which must do no work), `search` (configs/search_rehearsal.yaml:
   a few trials, then the refit of the top 2 on all 5 folds with out-of-fold predictions),
   `ensemble --method topk` and `--method greedy`, `report`, and `predict` of the test split
   (submission.csv checked row for row against sample_submission.csv, and NIfTI).

Per stage: wall time; peak resident memory of the stage's driver process (exact: the kernel's
maximum from wait4) and of the largest Ray worker and other descendant process (each process's
VmHWM, sampled every 0.5 s, so growth in a process's last half second can be missed), and the Ray
workers' largest anonymous memory (RssAnon, sampled: VmHWM also counts the cache's memory-mapped
pages, which the kernel can drop under pressure); bytes written
(the apparent size of the stage's output folders, after minus before). Results go to
`<out>/real_size.json` and are printed as a table; `--plot` draws time and memory against case-days.
Budgets (issue 12, at full size on 24 GiB and 2 cores) are checked and printed with each run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
GITSEG = [sys.executable, "-m", "gitseg"]
GIB = 1024**3
BUDGETS = {"peak_gib": 12.0, "prepare_s": 600.0, "tuning_s": 1200.0, "greedy_s": 1800.0,
           "oof_gb_per_configuration": 3.0}


# ---------------------------------------------------------------------------------------------
# Measuring a stage


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _peak_and_name(pid: int) -> tuple[int, int, str] | None:
    """(VmHWM, RssAnon now, command) of a process. VmHWM counts file-backed pages too (the cache's
    memory maps), which the kernel can drop; RssAnon is the memory a process cannot give back."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = {k: v for k, _, v in (line.partition(":") for line in f)}
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            name = f.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return None
    kib = lambda key: int(fields.get(key, "0 kB").split()[0]) * 1024  # noqa: E731
    return kib("VmHWM"), kib("RssAnon"), name


def folder_bytes(paths) -> int:
    total = 0
    for path in paths:
        path = Path(path)
        if path.is_file():
            total += path.stat().st_size
        elif path.is_dir():
            total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return total


def run_stage(name: str, args: list[str], outputs: list[Path], log_file: Path) -> dict:
    """Run `gitseg <args>` as its own process and measure it; a failure stops the rehearsal."""
    before = folder_bytes(outputs)
    print(f"[{time.strftime('%H:%M:%S')}] {name}: gitseg {' '.join(args)}", flush=True)
    started = time.perf_counter()
    with open(log_file, "a") as log:
        log.write(f"\n=== {name}: gitseg {' '.join(args)}\n")
        log.flush()
        proc = subprocess.Popen([*GITSEG, *args], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        peaks: dict[int, tuple[int, int, str]] = {}
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            for child in _descendants(proc.pid):
                seen = _peak_and_name(child)
                if seen:
                    hwm, anon, cmd = peaks.get(child, (0, 0, ""))
                    peaks[child] = (max(hwm, seen[0]), max(anon, seen[1]), seen[2])
            time.sleep(0.5)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}); see {log_file}")
    ray_workers = [hwm for hwm, _, cmd in peaks.values() if cmd.startswith("ray::")]
    ray_anon = [anon for _, anon, cmd in peaks.values() if cmd.startswith("ray::")]
    others = [hwm for hwm, _, cmd in peaks.values() if not cmd.startswith("ray::")]
    row = {"stage": name, "wall_s": round(wall, 1),
           "driver_peak_gib": round(usage.ru_maxrss * 1024 / GIB, 3),
           "ray_worker_peak_gib": round(max(ray_workers, default=0) / GIB, 3),
           "ray_worker_anon_peak_gib": round(max(ray_anon, default=0) / GIB, 3),
           "other_process_peak_gib": round(max(others, default=0) / GIB, 3),
           "processes_seen": len(peaks),
           "written_gb": round((folder_bytes(outputs) - before) / 1e9, 3)}
    print(f"    {wall:7.1f} s  driver {row['driver_peak_gib']:.2f} GiB  Ray worker {row['ray_worker_peak_gib']:.2f} "
          f"GiB (anonymous {row['ray_worker_anon_peak_gib']:.2f})  other {row['other_process_peak_gib']:.2f} GiB  "
          f"wrote {row['written_gb']:.2f} GB", flush=True)
    return row


# ---------------------------------------------------------------------------------------------
# The trees


def subset_tree(full: Path, out: Path, fraction: float, seed: int = 0) -> dict:
    """Links to whole cases of `full` holding about `fraction` of its labelled case-days (and of its
    test cases), with train.csv and sample_submission.csv filtered to them."""
    train = pd.read_csv(full / "train.csv", dtype=str, keep_default_na=False)
    sample = pd.read_csv(full / "sample_submission.csv", dtype=str, keep_default_na=False)
    case_of = lambda ids: ids.str.split("_").str[0]  # noqa: E731
    days = train["id"].str.rsplit("_slice", n=1).str[0].groupby(case_of(train["id"])).nunique()
    order = list(np.random.default_rng(seed).permutation(sorted(days.index)))
    target, chosen, total = fraction * days.sum(), [], 0
    for case in order:
        if total >= target - 0.5:
            break
        chosen.append(case)
        total += int(days[case])
    tests = sorted(set(case_of(sample["id"])))
    tests = list(np.random.default_rng(seed).permutation(tests))[: max(1, round(fraction * len(tests)))]
    if out.exists():
        shutil.rmtree(out)
    for split, cases in (("train", chosen), ("test", tests)):
        (out / split).mkdir(parents=True)
        for case in cases:
            (out / split / case).symlink_to((full / split / case).resolve())
    train[case_of(train["id"]).isin(chosen)].to_csv(out / "train.csv", index=False)
    sample[case_of(sample["id"]).isin(tests)].to_csv(out / "sample_submission.csv", index=False)
    return {"cases": len(chosen), "case_days": total, "test_cases": len(tests),
            "slices": int(train[case_of(train["id"]).isin(chosen)]["id"].nunique())}


# ---------------------------------------------------------------------------------------------
# One rehearsal


STAGES = ("prepare", "search", "topk", "greedy", "report", "predict")


def rehearse(full: Path, out: Path, fraction: float, search_config: str, trials: int | None,
             stages=STAGES, earlier: dict | None = None) -> dict:
    """Run `stages` (in pipeline order) on `fraction` of the case-days in `out`; a stage left out
    uses what an earlier rehearsal in `out` wrote, and its row in `earlier` (the record's entry for
    this fraction) is kept, so a rehearsal can be finished or a stage repeated alone."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / "stages.log"
    data, cache, storage = out / "data", out / "cache", out / "search"
    run_dir = storage / "rehearsal"
    cleared = {"prepare": [cache], "search": [storage], "topk": [run_dir / "ensemble_topk"],
               "greedy": [run_dir / "ensemble_greedy"], "report": [run_dir / "report"], "predict": [out / "predict"]}
    for stage in stages:
        for path in cleared[stage]:
            shutil.rmtree(path, ignore_errors=True)
    tree = subset_tree(full, data, fraction)
    print(f"== {fraction:g} of the case-days: {tree}; stages {', '.join(stages)}", flush=True)
    commit = machine()["commit"]
    rows = {s["stage"]: s for s in (earlier or {}).get("stages", [])}

    def measured(stage: str, name: str, args: list[str], outputs: list[Path]) -> None:
        if stage in stages:
            rows[name] = {**run_stage(name, args, outputs, log), "commit": commit}
        elif stage in ("prepare", "search") and not all(p.exists() for p in cleared[stage]):  # later stages need these
            raise SystemExit(f"stage {stage!r} was left out but {cleared[stage][0]} does not exist: run it too "
                             f"(--stages {stage} ...)")

    prepare = ["prepare", "--data", str(data), "--out", str(cache), "--size", "320", "--folds", "5",
               "--holdout", "0.15"]
    measured("prepare", "prepare", prepare, [cache])
    measured("prepare", "prepare again", prepare, [cache])
    search_args = ["search", "--config", search_config, "--set", f"storage_path={storage}",
                   "--set", f"set=[data.cache={cache}, out={out / 'train'}]"]
    if trials:
        search_args += ["--set", f"num_samples={trials}"]
    measured("search", "search + refit", search_args, [storage])
    for method in ("topk", "greedy"):
        measured(method, f"ensemble {method}", ["ensemble", "--run", str(run_dir), "--topk", "2", "--method", method,
                                                "--out", str(run_dir / f"ensemble_{method}")],
                 [run_dir / f"ensemble_{method}"])
    # The report and predict use the top-k ensemble, or the greedy one where the top-k stage has not run.
    ensemble = run_dir / ("ensemble_topk" if (run_dir / "ensemble_topk").exists() else "ensemble_greedy")
    measured("report", "report", ["report", "--run", str(run_dir), "--ensemble", str(ensemble)], [run_dir / "report"])
    measured("predict", "predict", ["predict", "--ensemble", str(ensemble), "--data", str(data),
                                    "--out", str(out / "predict"), "--nifti", str(out / "predict" / "nifti")],
             [out / "predict"])
    order = ["prepare", "prepare again", "search + refit", "ensemble topk", "ensemble greedy", "report", "predict"]
    return {"fraction": fraction, "tree": tree, "stages": [rows[n] for n in order if n in rows],
            "checks": check(out, run_dir, data, cache)}


def check(out: Path, run_dir: Path, data: Path, cache: Path) -> dict:
    """What each stage must have produced, and the figures the budgets are about."""
    checks: dict = {}
    sample = pd.read_csv(data / "sample_submission.csv", dtype=str, keep_default_na=False)
    if (out / "predict" / "submission.csv").exists():
        submission = pd.read_csv(out / "predict" / "submission.csv", dtype=str, keep_default_na=False)
        same = (len(submission) == len(sample)
                and set(zip(submission["id"], submission["class"])) == set(zip(sample["id"], sample["class"])))
        checks.update({"submission_rows": len(submission), "sample_rows": len(sample),
                       "submission_matches_sample": bool(same),
                       "nifti_files": len(list((out / "predict" / "nifti").glob("*.nii.gz")))})
    if not (run_dir / "refit.json").exists():
        return checks
    refit = json.loads((run_dir / "refit.json").read_text())
    oof_bytes: dict[int, int] = {}
    for model in refit["models"]:
        oof_bytes[model["rank"]] = oof_bytes.get(model["rank"], 0) + folder_bytes([model["oof"]])
    manifest = json.loads((cache / "manifest.json").read_text())
    labelled = [e for e in manifest["entries"] if not e["holdout"]]
    float16_gb = sum(3 * e["slices"] * e["height"] * e["width"] * 2 for e in labelled) / 1e9
    ensembles = {m: json.loads((run_dir / f"ensemble_{m}" / "ensemble.json").read_text()) for m in ("topk", "greedy")
                 if (run_dir / f"ensemble_{m}" / "ensemble.json").exists()}
    return {
        **checks,
        "oof_gb_per_configuration": {f"rank{r}": round(b / 1e9, 3) for r, b in sorted(oof_bytes.items())},
        "oof_float16_gb_per_configuration_and_view": round(float16_gb, 3),
        "tuning_s": {m: round(e["timings"]["tuning_s"], 1) for m, e in ensembles.items()},
        "ensemble_total_s": {m: round(e["timings"]["total_s"], 1) for m, e in ensembles.items()},
        "ensemble_phases_s": {m: {k: round(v, 1) for k, v in e["timings"].items()} for m, e in ensembles.items()},
        "ensemble_peak_memory_gib": {m: e.get("peak_memory_gib", {}) for m, e in ensembles.items()},
        "oof_score": {m: e["scores"]["oof"]["selected_at_0.5"] for m, e in ensembles.items()},
        "holdout_score": {m: e["scores"]["holdout"]["score"] for m, e in ensembles.items()
                          if e["scores"].get("holdout")},
    }


PEAKS = ("driver_peak_gib", "ray_worker_peak_gib", "other_process_peak_gib")


def peak_gib(row: dict) -> float:
    """A stage's largest process (GiB); a figure missing from a transcribed row counts as 0."""
    return max(row.get(k) or 0 for k in PEAKS)


def budgets(result: dict) -> list[str]:
    """The budgets of issue 12 (they hold at full size; smaller fractions are shown against them too).
    A stage with no row (not run yet) is shown as such."""
    rows, stages, checks = [], {s["stage"]: s for s in result["stages"]}, result["checks"]
    peaks = [peak_gib(s) for s in result["stages"]]
    rows.append(("no process above 12 GiB", max(peaks) <= BUDGETS["peak_gib"], f"{max(peaks):.2f} GiB"))
    if "prepare" in stages:
        rows.append(("prepare within 10 min", stages["prepare"]["wall_s"] <= BUDGETS["prepare_s"],
                     f"{stages['prepare']['wall_s']:.0f} s"))
        again = stages["prepare again"]
        rows.append(("prepare again does no work", again["written_gb"] <= 0.001,
                     f"{again['wall_s']:.0f} s, wrote {again['written_gb']} GB"))
    if checks.get("oof_gb_per_configuration"):
        oof = max(checks["oof_gb_per_configuration"].values())
        rows.append(("OOF at most 3 GB per configuration", oof <= BUDGETS["oof_gb_per_configuration"],
                     f"{oof:.2f} GB"))
    if "topk" in checks.get("tuning_s", {}):
        rows.append(("top-2 post-processing tuning within 20 min", checks["tuning_s"]["topk"] <= BUDGETS["tuning_s"],
                     f"{checks['tuning_s']['topk']:.0f} s"))
    if "greedy" in checks.get("ensemble_phases_s", {}):
        greedy = checks["ensemble_phases_s"]["greedy"]
        selection = greedy.get("cv_scores_s", 0) + greedy.get("selection_s", 0)
        whole = stages.get("ensemble greedy", {}).get("wall_s")
        rows.append(("greedy selection within 30 min", selection <= BUDGETS["greedy_s"],
                     f"{selection:.0f} s (OOF scores and selection; the whole command "
                     f"{'not measured' if whole is None else f'{whole:.0f} s'})"))
    if "submission_matches_sample" in checks:
        rows.append(("submission: one row per (slice, class) of sample_submission.csv",
                     checks["submission_matches_sample"], f"{checks['submission_rows']} rows"))
    lines = [f"  {'ok ' if ok else 'OVER'}  {what}: {figure}" for what, ok, figure in rows]
    missing = [n for n in ("prepare", "search + refit", "ensemble topk", "ensemble greedy", "report", "predict")
               if n not in stages]
    return lines + ([f"  not measured yet: {', '.join(missing)}"] if missing else [])


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(dict.fromkeys(s["stage"] for r in results for s in r["stages"]))
    for name in names:  # a stage not measured at some fraction has no point there
        points = [(r["tree"]["case_days"], s) for r in results for s in r["stages"] if s["stage"] == name]
        x = [cd for cd, _ in points]
        ax_t.plot(x, [s["wall_s"] / 60 for _, s in points], marker="o", label=name)
        known = [(cd, s) for cd, s in points if any(s.get(k) is not None for k in PEAKS)]  # transcribed: may lack
        ax_m.plot([cd for cd, _ in known], [peak_gib(s) for _, s in known], marker="o", label=name)
    ax_t.set(xlabel="case-days", ylabel="wall time (min)", title="time per stage")
    ax_m.set(xlabel="case-days", ylabel="peak resident memory of one process (GiB)", title="memory per stage")
    ax_m.axhline(BUDGETS["peak_gib"], color="red", lw=0.8, ls="--")
    ax_t.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def machine() -> dict:
    import torch  # heavy: only to name the CPU as the ensemble's latency figures do

    from gitseg.infer import device_name

    flags = Path("/proc/cpuinfo").read_text()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    return {"cpu": device_name(torch.device("cpu")), "cores": os.cpu_count(), "avx512": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags,
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
            "commit": commit.strip(), "python": platform.python_version()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/real_size")
    parser.add_argument("--fractions", nargs="+", type=float, default=[1.0])
    parser.add_argument("--search-config", default="configs/search_rehearsal.yaml")
    parser.add_argument("--trials", type=int, default=None, help="search trials (default: the search config's)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                        help="the stages to run (default: all); the others use an earlier rehearsal's outputs in "
                             "--out and keep their recorded figures")
    parser.add_argument("--synth", default=None,
                        help="the full synthetic tree (default: <out>/uwmgi, written by `gitseg synth` if missing)")
    parser.add_argument("--plot", action="store_true", help="draw time and memory against case-days")
    parser.add_argument("--only-table", action="store_true",
                        help="run nothing: print the recorded table (and --plot) of <out>/real_size.json")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    full = Path(args.synth).resolve() if args.synth else out / "uwmgi"
    record_path = out / "real_size.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {"runs": {}}
    if args.only_table:
        args.fractions = []  # the table and plot of what is recorded, nothing run
    else:
        record["machine"] = machine()
        if not (full / "train.csv").exists():
            if args.synth:
                raise SystemExit(f"--synth {full}: no train.csv there; leave --synth out to write the tree")
            record["synth"] = run_stage("synth", ["synth", "--profile", "uwmgi", "--out", str(full), "--overwrite"],
                                        [full], out / "synth.log")
    for fraction in args.fractions:
        stages = [s for s in STAGES if s in args.stages]
        result = rehearse(full, out / f"f{fraction:g}", fraction, args.search_config, args.trials, stages,
                          record["runs"].get(f"{fraction:g}"))
        result["machine"] = record["machine"]
        record["runs"][f"{fraction:g}"] = result
        record_path.write_text(json.dumps(record, indent=1))
        print("\n".join([f"budgets at {fraction:g} ({result['tree']['case_days']} case-days):", *budgets(result)]))
        print(json.dumps(result["checks"], indent=1), flush=True)
    runs = sorted(record["runs"].values(), key=lambda r: r["fraction"])
    header = f"{'stage':<16}" + "".join(f"{r['tree']['case_days']:>10} cd" for r in runs)
    print("\nwall time (s) / peak GiB of one process / GB written, per case-days:\n" + header)
    for name in dict.fromkeys(s["stage"] for r in runs for s in r["stages"]):
        cells = []
        for r in runs:
            s = next((s for s in r["stages"] if s["stage"] == name), None)
            if s is None:
                cells.append("-")
                continue
            peak = peak_gib(s)
            written = "?" if s.get("written_gb") is None else f"{s['written_gb']:.1f}"
            cells.append(f"{s['wall_s']:.0f}/{peak:.1f}/{written}")
        print(f"{name:<16}" + "".join(f"{c:>13}" for c in cells))
    if args.plot and len(runs) > 1:
        plot(runs, out / "real_size.png")
        print(f"plot: {out / 'real_size.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
