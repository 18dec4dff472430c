"""Which score after a few epochs predicts a trial's final ranking: the question of issue 15.

ASHA stops trials on their score at a rung (after grace_period x reduction_factor^k epochs). This
trains fixed configurations of bench_asha.py's space (one process, bench_asha.py's learner: 8
cases x 2 days x 48 slices at 64 px, 24 steps per epoch, `tu-test_resnet`) under one schedule, with
`train.ema` on (the EMA only averages; it does not change the training), and after each of the
epochs in --rungs scores the same run several ways on the validation fold (8 case-days):

    live        the optimiser's weights with BatchNorm's running statistics (gitseg's default)
    live+pbn    the same after precise BN: statistics recomputed over 32 training batches, here
                unaugmented ones (val_noise.recompute_bn; `train.precise_bn` in fit uses the
                epoch's augmented loader)
    ema         the EMA of the weights (`train.ema`, its own averaged statistics)
    ema+pbn     the EMA after precise BN
    cooldown    (wsd only) a branch: the live weights and optimiser copied, --cooldown-steps more
                steps with the learning rate falling linearly from its current value to 0, precise
                BN, scored; the main run continues from the fork point untouched

    live soft   the live weights' soft Dice (`soft_dice` of train.score_fold, gitseg.metrics: no threshold, so not 0
                for a model that draws no mask yet); its final is live's competition score
    ema soft    the same for the EMA; its final is ema's competition score

and after the last epoch the same ways once more. Then, over the configurations, the Spearman
correlation between each way's score at each rung and the final score of the same way (for
cooldown: live+pbn's, since at the end of a wsd run the learning rate has already decayed), and
with a common reference, the final live+pbn score.

    python benchmarks/rung_scores.py --schedule cosine|wsd [--seed 5] [--configs 1 2 3 ...]
        [--epochs 24] [--rungs 1 2 3 4 6 8] [--ema 0.99] [--cooldown-steps 8] [--save FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_asha import fixed_configurations  # benchmarks/ is on sys.path when this script runs
from val_noise import learner, recompute_bn

from gitseg.checkpoint import load_checkpoint, model_from_checkpoint
from gitseg.config import Config
from gitseg.data.cache import Cache, prepare
from gitseg.data.dataset import SliceDataset, build_augment
from gitseg.data.synth import write_dataset
from gitseg.losses import LossMix
from gitseg.train import Run, epoch_loader, fit, score_fold, train_one_epoch

WAYS = ("live", "live+pbn", "ema", "ema+pbn", "cooldown", "live soft", "ema soft")
FINAL_OF = {"cooldown": "live+pbn", "live soft": "live", "ema soft": "ema"}  # the final score a way predicts


def cooldown_branch(state: dict, cfg: Config, cache: Cache, train_days: list[str], lr: float, steps: int,
                    epoch: int) -> torch.nn.Module:
    """A copy of the live weights and optimiser trained `steps` more steps with the learning rate
    falling linearly from `lr` to 0 (gitseg's own training step: train_one_epoch under a wsd
    schedule that decays over all of its steps), then precise BN; the run it forks is untouched."""
    model = model_from_checkpoint({**state, "model": state["train_model"]})
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.train.weight_decay)
    optimizer.load_state_dict(state["optimizer"])
    branch_cfg = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, lr=lr, schedule="wsd", decay_fraction=1.0, min_lr_ratio=0.0, ema=0.0))
    dataset = SliceDataset(cache, train_days, cfg.data.channels, cfg.data.stride,
                           augment=build_augment(cfg.data.augment))
    run = Run(model=model, optimizer=optimizer, dataset=dataset, loss_fn=LossMix(cfg.train.loss),
              steps_per_epoch=steps, total_steps=steps, warmup_steps=0)
    device = torch.device("cpu")
    # Its own data order (the main run's next epoch would be epoch + 1's): seeded from the fork point.
    train_one_epoch(run, epoch_loader(run, branch_cfg, 10_000 + epoch, device), branch_cfg, 0, device)
    return recompute_bn(model, cache, cfg)


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    rho = spearmanr(a, b).statistic
    return float("nan") if rho is None or np.isnan(rho) else float(rho)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedule", choices=["cosine", "wsd"], required=True)
    parser.add_argument("--seed", type=int, default=5, help="bench_asha.py --seed of the configurations")
    parser.add_argument("--configs", type=int, nargs="+", default=list(range(1, 11)),
                        help="configuration numbers as in bench_asha.py (1 is the base, 2.. the fixed draws)")
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--base-lr", type=float, default=1e-4)
    parser.add_argument("--rungs", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8])
    parser.add_argument("--ema", type=float, default=0.99, help="train.ema decay (default 0.99)")
    parser.add_argument("--cooldown-steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save", default=None, help="write every score to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    draws = fixed_configurations(max(args.configs), args.seed)
    ways = [w for w in WAYS if args.schedule == "wsd" or w != "cooldown"]
    epochs = sorted({e for e in args.rungs if e < args.epochs} | {args.epochs})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_dataset(tmp / "data", cases=8, days=2, slices=48, size=64, seed=1, test_cases=0)
        prepare(tmp / "data", tmp / "cache", size=64, folds=2, holdout=0.0, log=lambda *_: None)
        cache = Cache(tmp / "cache")
        val_days, train_days = cache.case_days(folds=[0]), cache.case_days(folds=[1])
        print(f"schedule {args.schedule}, train.ema {args.ema}, {args.epochs} epochs x {args.steps} steps, "
              f"validation {len(val_days)} case-days, one process; scored after epochs {epochs}")
        scores: dict[int, dict[str, dict[int, float]]] = {}
        for number in args.configs:
            values, cfg = learner(number, draws, args.base_lr, tmp, args.epochs, args.steps,
                                  schedule=args.schedule, ema=args.ema)
            mine = scores[number] = {w: {} for w in ways}
            start = time.perf_counter()

            def report(metrics, checkpoint_dir):
                epoch = metrics["epoch"] + 1
                if epoch not in epochs:
                    return
                state = load_checkpoint(Path(checkpoint_dir) / "last.pt")
                live = model_from_checkpoint({**state, "model": state["train_model"]})
                ema = model_from_checkpoint(state)
                live_scores = score_fold(live, cache, val_days, cfg, "cpu")
                found = {"live": live_scores["score"], "live soft": live_scores["soft_dice"],
                         "ema soft": metrics["soft_dice"],
                         "live+pbn": score_fold(recompute_bn(live, cache, cfg), cache, val_days, cfg, "cpu")["score"],
                         "ema": metrics["score"],  # fit validated the EMA (no precise BN in fit here)
                         "ema+pbn": score_fold(recompute_bn(ema, cache, cfg), cache, val_days, cfg, "cpu")["score"]}
                if "cooldown" in ways:
                    if epoch < args.epochs:
                        cooled = cooldown_branch(state, cfg, cache, train_days, metrics["lr"], args.cooldown_steps,
                                                 epoch)
                        found["cooldown"] = score_fold(cooled, cache, val_days, cfg, "cpu")["score"]
                    else:
                        found["cooldown"] = found["live+pbn"]
                for way, value in found.items():
                    mine[way][epoch] = value

            fit(cfg, report=report, device="cpu", log=lambda *_: None)
            print(f"configuration {number} ({values}), {time.perf_counter() - start:.0f} s")
            for way in ways:
                print(f"  {way:9s} " + " ".join(f"{e}:{mine[way][e]:.3f}" for e in epochs))

        if args.save:
            Path(args.save).write_text(json.dumps({"args": vars(args), "scores": scores}, indent=1))
        numbers = list(scores)
        reference = [scores[n]["live+pbn"][args.epochs] for n in numbers]
        print(f"\nSpearman over {len(numbers)} configurations between the score after each epoch and the final "
              f"score of the same way (own) / the final live+pbn score (common):")
        print("  way        " + " ".join(f"{e:>11d}" for e in epochs if e < args.epochs) + "   mean over rungs")
        for way in ways:
            own_final = [scores[n][FINAL_OF.get(way, way)][args.epochs] for n in numbers]
            own = [spearman([scores[n][way][e] for n in numbers], own_final) for e in epochs if e < args.epochs]
            common = [spearman([scores[n][way][e] for n in numbers], reference) for e in epochs if e < args.epochs]
            print(f"  {way:9s}  " + " ".join(f"{o:+.2f}/{c:+.2f}".rjust(11) for o, c in zip(own, common))
                  + f"   {np.nanmean(own):+.2f}/{np.nanmean(common):+.2f}")
        finals = {w: max(scores[n][FINAL_OF.get(w, w)][args.epochs] for n in numbers) for w in ways}
        print("best final score by way: " + ", ".join(f"{w} {v:.4f}" for w, v in finals.items()))


if __name__ == "__main__":
    main()
