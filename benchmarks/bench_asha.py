"""ASHA vs the same search without early stopping, and the per-trial overhead of Ray.

Both searches run exactly the same configurations in the same order (drawn once from the space
with a seeded generator and given as `points`, so neither searcher's suggestions differ between
the arms), the same epochs, on the same synthetic data (2-worker DDP trials on a local Ray
instance): one with ASHA, one with FIFO (every trial runs all its epochs). Prints the
trial-epochs each spent and the best validation score each reached, as ratios. Overhead: per trial,
the time Tune measured for the trial minus the time its epochs
took (Ray Train start, worker start, checkpoint upload), as a fraction of the trial's time; with
--demo-cache also for one trial of the demo configuration (configs/demo.yaml, one epoch).

    python benchmarks/bench_asha.py [--trials 20] [--epochs 8] [--grace-period 2] [--reduction-factor 4]
        [--cases 6 --days 1 --slices 32 --steps 16] [--base-lr 0.003] [--seed 0] [--head-prior 0.01]
        [--precise-bn 32] [--save FILE] [--demo-cache runs/demo/cache]

--save keeps every epoch of every trial; `gitseg replay` replays other ASHA rules on it.

--budget (issue 15's benchmark of record) compares at equal compute instead: --trials x --epochs
without early stopping against ASHA given that many trial-epochs as `budget.trial_epochs` and up to
--budget-trials trials (the first --trials the same configurations); it prints the three targets
(best score, best at 40% of the budget, Spearman at the first rung), the final ranking's Spearman
between two halves of the validation case-days, and the replayed old question.

    python benchmarks/bench_asha.py --budget --trials 8 --epochs 16 [--budget-trials 48]
        [--schedule cosine] [--ema 0.99] ...
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from gitseg.config import ModelConfig, TrainConfig
from gitseg.data.cache import prepare
from gitseg.data.synth import write_dataset
from search.settings import AshaConfig

SPACE = {"train.lr": {"loguniform": [1e-4, 3e-2]}, "model.arch": {"choice": ["Unet", "FPN"]},
         "train.weight_decay": {"loguniform": [1e-6, 1e-2]}}


HISTORY_KEYS = ("epochs_done", "score", "best_score", "dice", "hausdorff", "train_loss", "epoch_time")


def fixed_configurations(n: int, seed: int = 0) -> list[dict]:
    """n configurations drawn once from SPACE: both arms evaluate exactly these."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [{"train.lr": float(np.exp(rng.uniform(np.log(1e-4), np.log(3e-2)))),
             "model.arch": str(rng.choice(["Unet", "FPN"])),
             "train.weight_decay": float(np.exp(rng.uniform(np.log(1e-6), np.log(1e-2))))} for _ in range(n)]


def search(tmp: Path, cache: Path, name: str, trials: int, epochs: int, asha: bool, base_overrides=None,
           space=None, reduction_factor: int = AshaConfig().reduction_factor,
           grace_period: int = AshaConfig().grace_period, points=None, steps: int = 16,
           base_lr: float = 0.003, head_prior: float | None = ModelConfig().head_prior,
           precise_bn: int = TrainConfig().precise_bn, schedule: str = TrainConfig().schedule,
           ema: float = TrainConfig().ema, budget: int | None = None) -> dict:
    base = {"out": str(tmp / "unused"), "data": {"cache": str(cache), "channels": 3, "stride": 1, "augment": 0.5},
            "model": {"arch": "Unet", "encoder": "tu-test_resnet", "head_prior": head_prior},
            # 16 steps per epoch by default: enough that trials differ after one epoch (with fewer,
            # many score exactly 0 at the first rung, and ASHA promotes ties)
            "train": {"epochs": epochs, "batch_size": 8, "max_steps_per_epoch": steps, "lr": base_lr,
                      "precise_bn": precise_bn, "schedule": schedule, "ema": ema}}
    if base_overrides:
        base = base_overrides
    (tmp / f"{name}-base.yaml").write_text(yaml.safe_dump(base))
    settings = {"name": name, "base": str(tmp / f"{name}-base.yaml"), "storage_path": str(tmp / "storage"),
                "num_samples": trials, "num_cpus": 3, "seed": 0, "max_failures": 0,
                "workers": {"num_workers": 2, "cpus_per_worker": 1},
                "asha": {"enabled": asha, "grace_period": grace_period, "reduction_factor": reduction_factor},
                "refit": {"topk": 0}, "points": points or [], "budget": {"trial_epochs": budget},
                "space": space or SPACE}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(settings))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "search", "--config", str(path)], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"search {name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    root = tmp / "storage" / name
    trials_out = []
    for result in (root / "tune").glob("*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        index = int(result.parent.name.split("_")[3])  # search_trial_<id>_<N>_...: the N-th configuration
        trials_out.append({"index": index, "epochs": max(r["epochs_done"] for r in rows),
                           "best": max(r["score"] for r in rows), "first": rows[0]["score"],
                           "trial_time": rows[-1]["time_total_s"], "epoch_time": sum(r["epoch_time"] for r in rows),
                           # every epoch's validation figures, for `gitseg replay`
                           "history": [{k: v for k, v in r.items()
                                        if k in HISTORY_KEYS or k.startswith(("score/", "dice/"))}
                                       for r in rows]})
    record = json.loads((root / "search.json").read_text())
    return {"wall": wall, "trials": trials_out, "anytime": record["anytime"], "rung_spearman": record["rung_spearman"],
            "compute": record["compute"], "checkpoints": [r["checkpoint"] for r in record["leaderboard"]
                                                          if r["status"] == "finished" and r["checkpoint"]]}


def halves_spearman(checkpoints: list[str], cache_dir: Path) -> tuple[float, int]:
    """Spearman, over the trials' best checkpoints, between their scores on the two halves of the
    validation case-days (split by case): how stable the final ranking is on this much validation."""
    from scipy.stats import spearmanr

    from gitseg.checkpoint import load_checkpoint, model_from_checkpoint
    from gitseg.config import Config, from_dict
    from gitseg.data.cache import Cache
    from gitseg.train import score_fold

    cache = Cache(cache_dir)
    days = cache.case_days(folds=[0])
    cases = sorted({cache.entries[d]["case"] for d in days})
    half = set(cases[: len(cases) // 2])
    first, second = [d for d in days if cache.entries[d]["case"] in half], [d for d in days
                                                                             if cache.entries[d]["case"] not in half]
    a, b = [], []
    for path in checkpoints:
        state = load_checkpoint(path)
        cfg, model = from_dict(Config, state["config"]), model_from_checkpoint(state)
        a.append(score_fold(model, cache, first, cfg, "cpu")["score"])
        b.append(score_fold(model, cache, second, cfg, "cpu")["score"])
    return float(spearmanr(a, b).statistic), len(first)


def best_by(anytime: list[dict], spent: int) -> float:
    """The best score a search had found once `spent` trial-epochs were spent (its anytime curve)."""
    return max((p["best_score"] for p in anytime if p["trial_epochs"] <= spent), default=float("nan"))


def equal_compute(args, tmp: Path, same: dict) -> None:
    """Issue 15's benchmark of record: N trials x E epochs without early stopping against ASHA given
    the same N x E trial-epochs as a budget (and so more trials: the first N are the same
    configurations in the same order, the rest further draws of the same seed)."""
    from search.replay import replay

    budget = args.trials * args.epochs
    more = args.budget_trials or 6 * args.trials
    points = fixed_configurations(more - 1, args.seed)  # the FIFO arm's first, then further draws
    fifo = search(tmp, tmp / "cache", "fifo", args.trials, args.epochs, asha=False, **same)
    asha = search(tmp, tmp / "cache", "asha", more, args.epochs, asha=True, budget=budget,
                  reduction_factor=args.reduction_factor, grace_period=args.grace_period,
                  **{**same, "points": points})
    if args.save:  # first: nothing below may lose the runs
        Path(args.save).write_text(json.dumps({"args": vars(args), "points": points,
                                               "fifo": fifo, "asha": asha}, indent=1))
        print(f"both arms in {args.save}")
    print(f"equal compute: {args.trials} trials x {args.epochs} epochs without early stopping = {budget} "
          f"trial-epochs; ASHA (grace {args.grace_period}, reduction factor {args.reduction_factor}) with "
          f"budget.trial_epochs {budget} and up to {more} trials; schedule {args.schedule}, train.ema {args.ema}, "
          f"train.precise_bn {args.precise_bn}, configuration seed {args.seed}")
    for name, run in (("no early stopping", fifo), ("ASHA + budget", asha)):
        full = [t for t in run["trials"] if t["epochs"] == args.epochs]
        last = max((t["history"][-1]["score"] for t in full), default=float("nan"))
        best = max(t["best"] for t in run["trials"])
        print(f"{name:18s}: {len(run['trials']):3d} trials ({len(full)} ran all epochs), "
              f"{run['compute']['trial_epochs']:4d} trial-epochs, best score {best:.4f}, "
              f"best last-epoch score {last:.4f}, wall {run['wall']:.0f} s")
    b_fifo = max(t["best"] for t in fifo["trials"])
    b_asha = max(t["best"] for t in asha["trials"])
    at40 = best_by(asha["anytime"], int(0.4 * budget))

    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 else float("nan")

    print(f"1. equal compute: ASHA / no early stopping best score {ratio(b_asha, b_fifo):.4f} "
          f"({'met' if b_asha >= b_fifo else 'not met'} in this seed: ASHA >= no early stopping)")
    print(f"2. anytime: ASHA's best after {int(0.4 * budget)} trial-epochs (40%) {at40:.4f} = "
          f"{ratio(at40, b_fifo):.4f} of no early stopping's best "
          f"({'met' if at40 >= 0.99 * b_fifo else 'not met'}: >= 0.99)")

    def rho(r):
        return "n/a" if r is None or r["spearman"] is None else f"{r['spearman']:+.2f}"

    first = next((r for r in fifo["rung_spearman"] if r["epoch"] == args.grace_period), None)
    print(f"3. Spearman of the score after epoch {args.grace_period} (ASHA's first rung) with the best score, over "
          f"the {len(fifo['trials'])} trials without early stopping: {rho(first)}; every epoch: "
          + " ".join(rho(r) for r in fifo["rung_spearman"]))
    stable, half = halves_spearman(fifo["checkpoints"], tmp / "cache")
    print(f"final ranking's stability: Spearman {stable:+.2f} between the {len(fifo['checkpoints'])} trials' best "
          f"checkpoints scored on two halves of the validation case-days ({half} + the rest, by case)")
    # The old question on the same curves: ASHA over the same N configurations, no budget. The
    # replay is trusted only where it reproduces the real arm: its first N trials are the same.
    old = replay(fifo["trials"], "score", args.grace_period, args.reduction_factor, args.epochs)
    real = {t["index"]: (t["epochs"], round(t["best"], 6)) for t in asha["trials"] if t["index"] <= args.trials}
    again = {t["index"]: (t["epochs"], round(t["best"], 6)) for t in old}
    print(f"old question (replay of ASHA on the {args.trials} configurations without a budget; "
          f"{'reproduces' if real == again else 'DOES NOT reproduce'} the real arm's first {args.trials} trials): "
          f"{sum(t['epochs'] for t in old) / budget:.2f} of the epochs, best score "
          f"{ratio(max(t['best'] for t in old), b_fifo):.4f} of no early stopping's")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--reduction-factor", type=int, default=AshaConfig().reduction_factor,
                        help="ASHA's reduction factor (default: the search's)")
    parser.add_argument("--grace-period", type=int, default=AshaConfig().grace_period,
                        help="ASHA's grace period in epochs (default: the search's)")
    parser.add_argument("--steps", type=int, default=16, help="cap on optimiser steps per epoch (default 16)")
    parser.add_argument("--cases", type=int, default=6, help="synthetic cases (default 6)")
    parser.add_argument("--base-lr", type=float, default=0.003,
                        help="lr of the base configuration, always trial 1 (async ASHA never stops the first "
                             "trial to reach a rung when trials run one at a time)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fixed configurations")
    parser.add_argument("--days", type=int, default=1, help="scan days per case (default 1)")
    parser.add_argument("--slices", type=int, default=32, help="slices per scan (default 32)")
    parser.add_argument("--head-prior", type=lambda v: None if v == "none" else float(v),
                        default=ModelConfig().head_prior,
                        help="model.head_prior of every trial (default: gitseg's default; none: smp's head init)")
    parser.add_argument("--precise-bn", type=int, default=TrainConfig().precise_bn,
                        help="train.precise_bn of every trial (default: gitseg's default)")
    parser.add_argument("--schedule", default=TrainConfig().schedule, help="train.schedule of every trial")
    parser.add_argument("--ema", type=float, default=TrainConfig().ema, help="train.ema of every trial")
    parser.add_argument("--budget", action="store_true",
                        help="equal compute (issue 15): ASHA gets --trials x --epochs trial-epochs as a budget")
    parser.add_argument("--budget-trials", type=int, default=None,
                        help="with --budget: most trials ASHA may start (default 6 x --trials)")
    parser.add_argument("--save", default=None,
                        help="write both arms' per-trial, per-epoch figures to this JSON file (input of "
                             "gitseg replay)")
    parser.add_argument("--demo-cache", default=None,
                        help="also time one 1-epoch trial of configs/demo.yaml on this prepared cache")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_dataset(tmp / "data", cases=args.cases, days=args.days, slices=args.slices, size=64, seed=1,
                      test_cases=0)
        manifest = prepare(tmp / "data", tmp / "cache", size=64, folds=2, holdout=0.0, log=lambda *_: None)
        # What an epoch really is: the fold-0 training slices shared by 2 ranks in batches of 8,
        # capped by --steps.
        train_slices = sum(e["slices"] for e in manifest["entries"] if e["fold"] != 0)
        steps = min(args.steps, max(1, train_slices // 2 // 8))
        # The base configuration is trial 1; the other trials are fixed draws, identical in both arms.
        points = fixed_configurations(args.trials - 1, args.seed)
        same = dict(points=points, steps=args.steps, base_lr=args.base_lr, head_prior=args.head_prior,
                    precise_bn=args.precise_bn, schedule=args.schedule, ema=args.ema)
        if args.budget:
            equal_compute(args, tmp, same)
            return
        fifo = search(tmp, tmp / "cache", "fifo", args.trials, args.epochs, asha=False, **same)
        asha = search(tmp, tmp / "cache", "asha", args.trials, args.epochs, asha=True,
                      reduction_factor=args.reduction_factor, grace_period=args.grace_period, **same)
        print(f"{args.trials} trials (the same configurations in both arms) x up to {args.epochs} epochs, 2-worker "
              f"DDP on CPU, {args.cases} cases x {args.days} days x {args.slices} slices at 64 px, {steps} optimiser "
              f"steps per epoch, model.head_prior {args.head_prior}, train.precise_bn {args.precise_bn}, one trial "
              f"at a time; ASHA grace period "
              f"{args.grace_period}, "
              f"reduction factor {args.reduction_factor}")
        for name, run in (("no early stopping", fifo), ("ASHA", asha)):
            epochs = sum(t["epochs"] for t in run["trials"])
            best = max(t["best"] for t in run["trials"])
            print(f"{name:18s}: {epochs:4d} trial-epochs, best score {best:.4f}, wall {run['wall']:.0f} s")
        e_fifo = sum(t["epochs"] for t in fifo["trials"])
        e_asha = sum(t["epochs"] for t in asha["trials"])
        b_fifo = max(t["best"] for t in fifo["trials"])
        b_asha = max(t["best"] for t in asha["trials"])
        print(f"ASHA / no early stopping: epochs {e_asha / e_fifo:.2f}, best score {b_asha / b_fifo:.3f}, "
              f"wall {asha['wall'] / fifo['wall']:.2f}")
        # What ASHA did with the configuration that ends best when every trial runs to the end.
        top = max(fifo["trials"], key=lambda t: t["best"])
        same = next((t for t in asha["trials"] if t["index"] == top["index"]), None)
        after_one = sorted(fifo["trials"], key=lambda t: -t["first"])
        print(f"FIFO's best is configuration {top['index']} ({top['best']:.4f}); ASHA ran it "
              f"{same['epochs'] if same else '?'} epoch(s) (best {same['best'] if same else float('nan'):.4f}); "
              f"after epoch 1 it ranked {1 + [t['index'] for t in after_one].index(top['index'])} of "
              f"{len(after_one)} in the FIFO run")
        if args.save:
            Path(args.save).write_text(json.dumps({"args": vars(args), "steps_per_epoch": steps, "points": points,
                                                   "fifo": fifo, "asha": asha}, indent=1))
            print(f"per-epoch figures of both arms in {args.save}")
        trials = fifo["trials"] + asha["trials"]
        overhead = [t["trial_time"] - t["epoch_time"] for t in trials]
        share = [o / t["trial_time"] for o, t in zip(overhead, trials)]
        print(f"per-trial overhead (tiny trials): {sum(overhead) / len(overhead):.1f} s, "
              f"{100 * sum(share) / len(share):.0f}% of trial time")
        if args.demo_cache:
            demo = yaml.safe_load(open("configs/demo.yaml"))
            full_epochs = demo["train"]["epochs"]
            demo["data"]["cache"] = str(Path(args.demo_cache).resolve())
            demo["train"]["epochs"] = 1
            run = search(tmp, Path(demo["data"]["cache"]), "demo", 1, 1, asha=False, base_overrides=demo,
                         space={"train.lr": {"loguniform": [1e-3, 3e-3]}})
            t = run["trials"][0]
            fixed = t["trial_time"] - t["epoch_time"]
            print(f"demo configuration, one epoch: trial {t['trial_time']:.0f} s, epoch {t['epoch_time']:.0f} s, "
                  f"overhead {fixed:.0f} s = {100 * fixed / t['trial_time']:.0f}% of the trial; for a "
                  f"{full_epochs}-epoch trial {100 * fixed / (fixed + full_epochs * t['epoch_time']):.0f}%")


if __name__ == "__main__":
    main()
