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

--save keeps every epoch of every trial; benchmarks/asha_replay.py replays other ASHA rules on it.
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
           precise_bn: int = TrainConfig().precise_bn) -> dict:
    base = {"out": str(tmp / "unused"), "data": {"cache": str(cache), "channels": 3, "stride": 1, "augment": 0.5},
            "model": {"arch": "Unet", "encoder": "tu-test_resnet", "head_prior": head_prior},
            # 16 steps per epoch by default: enough that trials differ after one epoch (with fewer,
            # many score exactly 0 at the first rung, and ASHA promotes ties)
            "train": {"epochs": epochs, "batch_size": 8, "max_steps_per_epoch": steps, "lr": base_lr,
                      "precise_bn": precise_bn}}
    if base_overrides:
        base = base_overrides
    (tmp / f"{name}-base.yaml").write_text(yaml.safe_dump(base))
    settings = {"name": name, "base": str(tmp / f"{name}-base.yaml"), "storage_path": str(tmp / "storage"),
                "num_samples": trials, "num_cpus": 3, "seed": 0, "max_failures": 0,
                "workers": {"num_workers": 2, "cpus_per_worker": 1},
                "asha": {"enabled": asha, "grace_period": grace_period, "reduction_factor": reduction_factor},
                "refit": {"topk": 0}, "points": points or [],
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
                           # every epoch's validation figures, for benchmarks/asha_replay.py
                           "history": [{k: v for k, v in r.items()
                                        if k in HISTORY_KEYS or k.startswith(("score/", "dice/"))}
                                       for r in rows]})
    return {"wall": wall, "trials": trials_out}


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
    parser.add_argument("--save", default=None,
                        help="write both arms' per-trial, per-epoch figures to this JSON file (input of "
                             "benchmarks/asha_replay.py)")
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
                    precise_bn=args.precise_bn)
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
