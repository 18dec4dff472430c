"""How much of the per-epoch validation score is noise: the question behind ASHA's benchmark.

ASHA ranks trials on the score after a few epochs; the benchmark compares best scores. Both are
only as good as the score is stable. This trains a few configurations of bench_asha.py's space
(one process, the same data, steps and schedule as its runs) and, after every epoch, scores the
same model three ways:

    fold   the validation fold the benchmark uses (4 of the 8 cases)
    large  24 further synthetic cases, never trained on (6x the slices)
    bn     the validation fold again, after recomputing BatchNorm's statistics over 32 training
           batches (its running statistics otherwise follow the last few noisy batches)

and prints, per configuration and way, the epoch-to-epoch noise in the last third of training
(standard deviation of the score around its own 3-epoch moving average, where the learning rate
is already small) and the best and final scores; then, over the configurations, how well each
way's score after k epochs ranks them by their final score on the large set (Spearman).

    python benchmarks/val_noise.py [--seed 3] [--configs 12 3 17] [--epochs 24]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_asha import fixed_configurations  # benchmarks/ is on sys.path when this script runs

from gitseg.checkpoint import load_checkpoint, model_from_checkpoint
from gitseg.config import Config, from_dict
from gitseg.data.cache import Cache, prepare
from gitseg.data.dataset import SliceDataset
from gitseg.data.synth import write_dataset
from gitseg.train import fit, precise_bn, score_fold


def recompute_bn(model, cache: Cache, cfg: Config, batches: int = 32) -> torch.nn.Module:
    """A copy of `model` with `train.precise_bn`'s statistics, over unaugmented training batches."""
    model = copy.deepcopy(model)
    train_days = cache.case_days(folds=[f for f in range(cache.manifest["folds"]) if f != cfg.data.fold])
    data = SliceDataset(cache, train_days, cfg.data.channels, cfg.data.stride)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.train.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    precise_bn(model, loader, batches, "cpu", channels_last=False)
    return model.eval()


def learner(number: int, draws: list[dict], base_lr: float, tmp: Path, epochs: int, steps: int,
            **train) -> tuple[dict, Config]:
    """Configuration `number` of bench_asha.py's list (1: the base at `base_lr`, 2..: the fixed
    draws) as one process trains it here, on `tmp`/cache; `train` adds train.* settings."""
    values = {"train.lr": base_lr} if number == 1 else draws[number - 2]
    base = {"out": str(tmp / f"run{number}"),
            "data": {"cache": str(tmp / "cache"), "channels": 3, "stride": 1, "augment": 0.5},
            "model": {"arch": values.get("model.arch", "Unet"), "encoder": "tu-test_resnet"},
            "train": {"epochs": epochs, "batch_size": 8, "max_steps_per_epoch": steps, "lr": values["train.lr"],
                      "weight_decay": values.get("train.weight_decay", 1e-4), **train}}
    return values, from_dict(Config, base)


def noise(scores: list[float]) -> float:
    """Std of the scores around their centred 3-epoch moving average, over the last third."""
    if len(scores) < 6:
        return float("nan")
    s = np.asarray(scores)
    tail = s[len(s) * 2 // 3:]
    smooth = np.convolve(s, np.ones(3) / 3, mode="same")[len(s) * 2 // 3:]
    return float(np.std((tail - smooth)[:-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=3, help="bench_asha.py --seed of the configurations")
    parser.add_argument("--configs", type=int, nargs="+", default=[12, 3, 17],
                        help="configuration numbers as in bench_asha.py (1 is the base, 2.. the fixed draws)")
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--base-lr", type=float, default=1e-4)
    args = parser.parse_args()
    torch.set_num_threads(2)
    draws = fixed_configurations(20, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_dataset(tmp / "data", cases=8, days=2, slices=48, size=64, seed=1, test_cases=0)
        prepare(tmp / "data", tmp / "cache", size=64, folds=2, holdout=0.0, log=lambda *_: None)
        write_dataset(tmp / "more", cases=24, days=2, slices=48, size=64, seed=2, test_cases=0)
        prepare(tmp / "more", tmp / "more-cache", size=64, folds=2, holdout=0.0, log=lambda *_: None)
        large = Cache(tmp / "more-cache")
        small = Cache(tmp / "cache")
        print(f"validation: fold = {len(small.case_days(folds=[0]))} case-days, large = "
              f"{len(large.case_days())} case-days; {args.epochs} epochs x {args.steps} steps, one process")
        curves = {}
        for number in args.configs:
            values, cfg = learner(number, draws, args.base_lr, tmp, args.epochs, args.steps)
            ways = {"fold": [], "large": [], "bn": []}
            start = time.perf_counter()

            def report(metrics, checkpoint_dir):
                model = model_from_checkpoint(load_checkpoint(Path(checkpoint_dir) / "last.pt"))
                ways["fold"].append(metrics["score"])
                ways["large"].append(score_fold(model, large, large.case_days(), cfg, "cpu")["score"])
                ways["bn"].append(score_fold(recompute_bn(model, small, cfg), small, small.case_days(folds=[0]),
                                           cfg, "cpu")["score"])

            fit(cfg, report=report, device="cpu", log=lambda *_: None)
            curves[number] = ways
            print(f"configuration {number} ({values}), {time.perf_counter() - start:.0f} s")
            for way, scores in ways.items():
                print(f"  {way:6s} noise {noise(scores):.4f}  best {max(scores):.4f} "
                      f"(epoch {int(np.argmax(scores)) + 1})"
                      f"  final {scores[-1]:.4f}  per epoch {' '.join(f'{s:.3f}' for s in scores)}")

        if len(curves) > 2:
            from scipy.stats import spearmanr

            final = [c["large"][-1] for c in curves.values()]
            print(f"Spearman over {len(curves)} configurations with the final score on the large set, after k epochs:")
            for way in ("fold", "large", "bn"):
                rho = [spearmanr([c[way][k] for c in curves.values()], final).statistic for k in range(args.epochs)]
                best = spearmanr([max(c[way]) for c in curves.values()], final).statistic
                print(f"  {way:6s} " + " ".join(f"{r:+.2f}" for r in rho) + f"   best-of-all-epochs {best:+.2f}")


if __name__ == "__main__":
    main()
