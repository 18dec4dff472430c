"""gitseg against nnU-Net on the same data, split, metric and compute (issue 34).

    make bench-nnunet                  # .venv, nnU-Net in its own .venv-peer, then --epochs 3 9 30
    make bench-nnunet EPOCHS=9         # one point; the points already measured in the folder stay

The points of record so far are kept in benchmarks/records/bench_nnunet.json (copied into a new
`--out` folder first; copy the folder's file back there after a point of record).

For each gitseg budget (`--epochs E`: `gitseg demo`'s pipeline, `run_demo`, with E epochs per trial
on the data below), in one session on one machine, nothing else running:

1. **gitseg**: search, refit and the top-2 ensemble (which keeps fewer configurations where the OOF
   says so), wall time T. Its holdout rows: the tuned ensemble, the best single configuration and
   the best single fold model, each with TTA and its own tuned post-processing.
2. **nnU-Net, given the same wall time T** for its whole run: the gitseg cache exported with
   `gitseg export --to nnunet` (regions: the overlapping masks kept; gitseg's folds in
   `splits_final.json`, copied to nnU-Net's preprocessed folder), `nnUNetv2_plan_and_preprocess -c
   2d`, then both folds trained with `nnUNetTrainer_gitsegBudget` (this file writes it into the
   peer environment: nnU-Net's own trainer with `num_epochs` and iterations per epoch set from the
   budget, nothing else changed), `nnUNetv2_find_best_configuration` (its post-processing). The
   epochs: a 1-epoch run of fold 0 first (calibration, reported, not counted in T) gives the time of
   an epoch (nnU-Net's "Epoch time") and of a run's start-up and final validation; both folds get
   (T - preprocessing) / 2 minus that overhead. Where fewer than 3 epochs fit, a plans variant with
   the largest 2d batch that fits 3 (`fit_budget`; the same preprocessed data) is used and reported.
   Then `nnUNetv2_predict` of the holdout with both folds and `nnUNetv2_apply_postprocessing`.
3. Both systems' holdout predictions scored by gitseg's metric (`score_label_volumes` for nnU-Net's
   label maps, tested in tests/test_sources.py), and the paired bootstrap over holdout cases of
   gitseg's ensemble minus nnU-Net's fold ensemble.

Data: the realistic phantom, `--cases` cases x 3 days (the demo's slices, `--size` 256 px: pixels finer
than the slices, as in the real data), `--holdout` of the cases held out, 2 folds, gitseg's cache at
the demo's 64 px. Writes `<out>/bench_nnunet.json` and
prints the table. Protocol and results: BENCHMARKS.md, "Head to head with nnU-Net".
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

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT / ".venv-peer"
DATASET_ID = 534
KEPT = ROOT / "benchmarks" / "records" / "bench_nnunet.json"  # the points of record so far, kept in the repository
TRAINER = "nnUNetTrainer_gitsegBudget"
TRAINER_CODE = '''"""Written by gitseg's benchmarks/bench_nnunet.py: nnU-Net's own trainer, its length set by the
benchmark's budget (GITSEG_NNUNET_EPOCHS, GITSEG_NNUNET_ITERATIONS per epoch); nothing else differs."""
import os

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_gitsegBudget(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ["GITSEG_NNUNET_EPOCHS"])
        self.num_iterations_per_epoch = int(os.environ.get("GITSEG_NNUNET_ITERATIONS", 250))
        self.num_val_iterations_per_epoch = max(1, self.num_iterations_per_epoch // 5)
'''


def peer(tool: str) -> str:
    path = PEER / "bin" / tool
    if not path.is_file():
        sys.exit(f"{path} not found: run `make peer` first (nnU-Net in its own environment)")
    return str(path)


def install_trainer() -> Path:
    """The budget trainer inside the peer environment's nnU-Net package (nnU-Net finds trainers by
    class name in its own package)."""
    site = next((PEER / "lib").glob("python3*/site-packages/nnunetv2/training/nnUNetTrainer/variants"))
    path = site / "gitseg_budget.py"
    path.write_text(TRAINER_CODE)
    return path


def timed(cmd: list[str], env: dict, log: Path) -> float:
    start = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        done = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"{cmd[0]} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def nnunet_env(work: Path, **extra) -> dict:
    env = {**os.environ, "nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "preprocessed"),
           "nnUNet_results": str(work / "results"), "nnUNet_n_proc_DA": "2", "OMP_NUM_THREADS": "2",
           **{k: str(v) for k, v in extra.items()}}
    env.pop("PYTHONPATH", None)
    return env


CALIBRATION_ITERATIONS = 5  # one epoch of this many iterations measures a step; a full epoch can take half an hour


def fit_budget(preprocessed: Path, calibration_log: str, calib_s: float, budget_s: float, iterations: int):
    """(plans name, 2d batch size, epochs per fold, seconds per epoch of `iterations`, seconds of a run's
    start-up and final validation) so that both folds fit `budget_s`. The calibration run trains one
    epoch of CALIBRATION_ITERATIONS iterations (and a fifth as many validation iterations, as every
    epoch here): the "Epoch time" nnU-Net logs for it, scaled to `iterations`, is an epoch's time;
    the rest of the run is the per-fold overhead. With fewer than 3 epochs at the planned batch, a
    plans variant: the planned plans with the largest 2d batch that fits 3 epochs (an epoch's time
    taken as proportional to the batch), the same preprocessed data."""
    import re

    times = [float(t) for t in re.findall(r"Epoch time: ([0-9.]+) s", calibration_log)]
    if not times:
        sys.exit("the calibration run logged no epoch time; see nnunet.log")
    overhead_s = max(0.0, calib_s - times[-1])
    epoch_s = times[-1] * iterations / CALIBRATION_ITERATIONS
    per_fold = budget_s / 2 - overhead_s
    planned = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    batch0 = int(planned["configurations"]["2d"]["batch_size"])
    if per_fold >= 3 * epoch_s:
        return "nnUNetPlans", batch0, int(per_fold / epoch_s), epoch_s, overhead_s
    batch = max(2, int(batch0 * per_fold / (3 * epoch_s)))
    name = f"nnUNetPlans_gitsegBatch{batch}"
    variant = {**planned, "plans_name": name}
    variant["configurations"] = {**planned["configurations"],
                                 "2d": {**planned["configurations"]["2d"], "batch_size": batch}}
    (preprocessed / f"{name}.json").write_text(json.dumps(variant, indent=1))
    epochs = max(1, int(per_fold / (epoch_s * batch / batch0)))
    return name, batch, epochs, epoch_s, overhead_s


def run_nnunet(cache: Path, work: Path, budget_s: float, iterations: int, log) -> dict:
    """nnU-Net's whole run within `budget_s`; returns its times, epochs and the holdout prediction folder."""
    from gitseg.data.export import export_nnunet

    if work.exists():
        shutil.rmtree(work)
    name = f"Dataset{DATASET_ID}_Gitseg"
    raw = work / "raw" / name
    export_nnunet(cache, raw, overlap="regions", log=log)
    install_trainer()
    logfile = work / "nnunet.log"
    env = nnunet_env(work)
    times = {"preprocess_s": timed([peer("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "2d",
                                    "--verify_dataset_integrity", "-np", "2"], env, logfile)}
    shutil.copy2(raw / "splits_final.json", work / "preprocessed" / name / "splits_final.json")
    train = [peer("nnUNetv2_train"), str(DATASET_ID), "2d"]
    before = logfile.read_text()
    calib = timed([*train, "0", "-tr", TRAINER, "-device", "cpu"],
                  nnunet_env(work, GITSEG_NNUNET_EPOCHS=1, GITSEG_NNUNET_ITERATIONS=CALIBRATION_ITERATIONS), logfile)
    shutil.rmtree(work / "results" / name)  # the calibration's model is not used
    plans, batch, epochs, epoch_s, overhead_s = fit_budget(
        work / "preprocessed" / name, logfile.read_text()[len(before):], calib, budget_s - times["preprocess_s"],
        iterations)
    log(f"bench: nnU-Net calibration: {calib:.0f} s for one epoch of {CALIBRATION_ITERATIONS} iterations with its "
        f"start-up and final validation ({overhead_s:.0f} s); an epoch of {iterations} iterations {epoch_s:.0f} s at "
        f"the planned batch; {plans} (2d batch {batch}), {epochs} epoch(s) per fold for {budget_s:.0f} s")
    env = nnunet_env(work, GITSEG_NNUNET_EPOCHS=epochs, GITSEG_NNUNET_ITERATIONS=iterations)
    times["train_s"] = sum(timed([*train, str(f), "-tr", TRAINER, "-p", plans, "-device", "cpu", "--npz"], env,
                                 logfile) for f in (0, 1))
    times["find_best_s"] = timed([peer("nnUNetv2_find_best_configuration"), str(DATASET_ID), "-c", "2d",
                                  "-tr", TRAINER, "-p", plans, "-f", "0", "1"], env, logfile)
    crossval = work / "results" / name / f"{TRAINER}__{plans}__2d" / "crossval_results_folds_0_1"
    pred, post = work / "pred", work / "pred_pp"
    times["predict_s"] = timed([peer("nnUNetv2_predict"), "-i", str(raw / "imagesTs"), "-o", str(pred), "-d",
                                str(DATASET_ID), "-c", "2d", "-tr", TRAINER, "-p", plans, "-f", "0", "1",
                                "-device", "cpu"],
                               env, logfile)
    times["postprocess_s"] = timed([peer("nnUNetv2_apply_postprocessing"), "-i", str(pred), "-o", str(post),
                                    "-pp_pkl_file", str(crossval / "postprocessing.pkl"), "-np", "2",
                                    "-plans_json", str(crossval / "plans.json")], env, logfile)
    times["whole_run_s"] = times["preprocess_s"] + times["train_s"] + times["find_best_s"]
    # The cross-check: nnU-Net's own Dice of the same predictions (per region, its summary.json).
    summary = work / "summary.json"
    timed([peer("nnUNetv2_evaluate_folder"), str(raw / "labelsTs"), str(post), "-djfile", str(raw / "dataset.json"),
           "-pfile", str(crossval / "plans.json"), "-o", str(summary), "-np", "2"], env, logfile)
    own = json.loads(summary.read_text())
    return {"times": times, "calibration_epoch_s": calib, "epoch_s": epoch_s, "overhead_s": overhead_s,
            "plans": plans, "batch_size": batch, "epochs": epochs, "iterations": iterations,
            "pred": str(pred), "pred_pp": str(post), "own_dice": {k: v.get("Dice") for k, v in own["mean"].items()},
            "own_foreground_dice": own.get("foreground_mean", {}).get("Dice")}


CURVES = (("gitseg", "ensemble + TTA + tuned post-processing", "gitseg tuned ensemble"),
          ("gitseg", "best single configuration + TTA + tuned post-processing", "gitseg best configuration"),
          ("gitseg", "best single fold model + TTA + tuned post-processing", "gitseg best fold model"),
          ("nnunet", "score", "nnU-Net fold ensemble + its post-processing"))


def plot(results: list[dict], path: Path) -> None:
    """Holdout score against each system's own wall time (gitseg's whole run; nnU-Net's preprocessing,
    training and configuration selection), one point per budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for system, key, label in CURVES:
        if system == "gitseg":
            points = [(r["gitseg_s"], r["gitseg"].get(key)) for r in results]
        else:
            points = [(r["nnunet"]["times"]["whole_run_s"], r["nnunet_scores"][key]) for r in results]
        points = [(t / 60, y) for t, y in points if y is not None]
        if not points:
            continue
        ax.plot(*zip(*points), marker="o", ls="-" if system == "nnunet" or "ensemble" in key else ":", label=label)
    for r in results:
        ax.annotate(f"{r['epochs']} ep.", (r["gitseg_s"] / 60, r["gitseg"].get(CURVES[0][1], 0)), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))
    ax.set(xlabel="wall time of the whole run (min, this machine)", ylabel="holdout score (competition metric)",
           title="gitseg against nnU-Net at equal compute")
    ax.set_xscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    from ensemble.selection.evaluate import paired_gain, score_label_volumes
    from gitseg.data.cache import Cache
    from gitseg.demo import DATA, run_demo
    from gitseg.infer import cpu_has_native_bf16

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench_nnunet")
    parser.add_argument("--epochs", type=int, nargs="+", default=[3, 9, 30], help="gitseg's budgets")
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--size", type=int, default=256,
                        help="the scans' longer side in px (256: 2.1 mm pixels, finer than the 3 mm slices, as in "
                             "the real data; gitseg's cache stays at the demo's 64 px)")
    parser.add_argument("--holdout", type=float, default=0.375, help="share of the cases held out (6 of 16)")
    parser.add_argument("--iterations", type=int, default=50, help="nnU-Net iterations per epoch (its default 250)")
    parser.add_argument("--plot-only", action="store_true", help="redraw the curve from <out>/bench_nnunet.json")
    parser.add_argument("--reuse-gitseg", action="store_true",
                        help="where a point's gitseg arm finished (its demo.json), keep it and run nnU-Net's arm only "
                             "(for a peer run that stopped; both arms still in one session)")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads((Path(args.out) / "bench_nnunet.json").read_text()), Path(args.out) / "bench_nnunet.png")
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    machine = f"{platform.processor() or platform.machine()}; native bf16: {cpu_has_native_bf16()}"
    print(f"commit {commit}; {machine}")
    out = Path(args.out)
    # Points already measured (in this folder, by an earlier session) stay unless this run measures them again:
    # each point compares both systems within one session; a curve may join points of several sessions, and
    # every point names its commit, machine and date.
    record = out / "bench_nnunet.json"
    if not record.is_file() and KEPT.is_file():  # the points of record measured in earlier sessions
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy2(KEPT, record)
    results = json.loads(record.read_text()) if record.is_file() else []
    for epochs in args.epochs:
        results = [r for r in results if r["epochs"] != epochs]
        point = out / f"e{epochs}"
        done = next((point / "gitseg" / "search").glob("*/demo.json"), None) if args.reuse_gitseg else None
        if done is not None:  # this point's gitseg arm, finished earlier in this session: its wall time stands
            headline = json.loads(done.read_text())
            gitseg_s = headline["elapsed_s"]
            print(f"bench: reusing {done} ({gitseg_s / 60:.1f} min)")
        else:
            start = time.perf_counter()
            headline = run_demo(out=point / "gitseg", epochs=epochs, holdout=args.holdout,
                                data={**DATA, "cases": args.cases, "size": args.size, "anatomy": "realistic"})
            gitseg_s = time.perf_counter() - start
        run_dir = Path(headline["ensemble"]).parent
        cache = Cache(point / "gitseg" / "cache")
        rows = json.loads((run_dir / "ensemble" / "evaluation.json").read_text())["rows"]
        manifest = json.loads((run_dir / "ensemble" / "ensemble.json").read_text())
        peer_run = run_nnunet(point / "gitseg" / "cache", point / "nnunet", gitseg_s, args.iterations, print)
        nn, nn_rows = score_label_volumes(cache, peer_run["pred_pp"])
        nn_raw, _ = score_label_volumes(cache, peer_run["pred"])
        tuned = {r["variant"]: r["score"] for r in manifest["scores"]["holdout"]["ablation"]}
        ensemble_rows = rows["ensemble + TTA + tuned post-processing"] if (
            "ensemble + TTA + tuned post-processing" in rows) else rows["ensemble, no TTA + tuned post-processing"]
        gain = paired_gain(ensemble_rows, nn_rows)
        result = {"epochs": epochs, "gitseg_s": gitseg_s, "nnunet": peer_run, "commit": commit, "machine": machine,
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gitseg_reused": done is not None,
                  "holdout_case_days": len(cache.case_days(holdout=True)),
                  "gitseg": tuned, "nnunet_scores": nn, "nnunet_no_postprocessing": nn_raw,
                  "ensemble_minus_nnunet": {"gain": gain.gain, "ci95": list(gain.ci95)}}
        results = sorted([*results, result], key=lambda r: r["epochs"])
        record.write_text(json.dumps(results, indent=1))
        plot(results, out / "bench_nnunet.png")
        print(f"\nbudget {gitseg_s / 60:.1f} min (gitseg {epochs} epochs; nnU-Net {peer_run['epochs']} epochs of "
              f"{args.iterations} iterations, whole run {peer_run['times']['whole_run_s'] / 60:.1f} min):")
        for variant, score in tuned.items():
            print(f"  gitseg {variant:<56} {score:.4f}")
        print(f"  nnU-Net fold ensemble + its post-processing{'':<17} {nn['score']:.4f} "
              f"(without: {nn_raw['score']:.4f})")
        print(f"  gitseg ensemble - nnU-Net: {gain.gain:+.4f} [{gain.ci95[0]:+.4f}, {gain.ci95[1]:+.4f}]")
        print(f"  cross-check: gitseg's Dice of nnU-Net's prediction {nn['dice']:.4f} (per class: "
              + ", ".join(f"{c} {nn[f'dice/{c}']:.4f}" for c in ("large_bowel", "small_bowel", "stomach"))
              + f"); nnU-Net's own Dice per region {peer_run['own_dice']}")


if __name__ == "__main__":
    main()
