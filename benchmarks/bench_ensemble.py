"""Ensemble benchmarks: prediction throughput and the post-processing search, each vs a baseline.

1. Prediction, K configurations x F folds x TTA on one volume. Baseline: the naive loop of
   bench_infer (one slice at a time, one forward per TTA view) run member by member and averaged.
   gitseg: `EnsembleModel.probs` (members sharing a window batched together, TTA views fused into
   the batch, BatchNorm folded, bf16 where the CPU/GPU has it). Same members, same precision
   policy; the outputs must agree.
2. Post-processing search on out-of-fold probabilities: `tune` (per-class sums, masks scored once
   per distinct mask) vs `tune_naive` (the same coordinate search, every candidate post-processed
   and scored from scratch). Must find the same parameters.
3. With --ensemble DIR: the holdout ablation that `gitseg ensemble` measured, step by step.

    python benchmarks/bench_ensemble.py [--run SEARCH_DIR] [--ensemble DIR] [--configs 2 --folds 3]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_infer import naive_predict  # noqa: E402
from naive_tune import tune_naive  # noqa: E402

from ensemble.model import EnsembleModel, Member  # noqa: E402
from ensemble.selection.postprocess import PostProcess, tune  # noqa: E402
from gitseg import records  # noqa: E402
from gitseg.config import ModelConfig  # noqa: E402
from gitseg.models import build_model  # noqa: E402
from gitseg.records import ENSEMBLE_MANIFEST, EnsembleManifest  # noqa: E402


def bench_prediction(args, device) -> None:
    torch.manual_seed(0)
    n = args.configs * args.folds
    nets = [build_model(ModelConfig(arch=args.arch, encoder=args.encoder), in_channels=3).to(device).eval()
            .to(memory_format=torch.channels_last) for _ in range(n)]
    members = [Member(file=f"m{i}", weight=1.0, size=args.size, channels=3, stride=2,
                      configuration=f"rank{i // args.folds}",
                      fold=i % args.folds) for i in range(n)]
    model = EnsembleModel(".", members, args.tta, PostProcess(), device)
    volume = np.random.default_rng(0).random((args.slices, args.size, args.size)).astype(np.float16)

    # gitseg's engine first, then the naive loop: on a GPU machine with a time limit the figure that
    # matters (seconds per case-day) is printed before the slow baseline runs.
    start = time.perf_counter()
    for m, net in zip(members, nets):  # what EnsembleModel.network does on first use, timed apart
        from gitseg.infer import prepare_for_inference
        model._models[m.file] = prepare_for_inference(net)
    t_prepare = time.perf_counter() - start
    model.probs({args.size: volume}, None)  # warm-up: every batch shape once (cuDNN picks its kernels per shape)
    start = time.perf_counter()
    fused = model.probs({args.size: volume}, None)
    t_fused = time.perf_counter() - start
    views = {"none": 1, "hflip": 2, "flips": 4}[args.tta]
    print(f"\n1. Ensemble prediction: {args.configs} configurations x {args.folds} folds = {n} "
          f"{args.arch}/{args.encoder}, TTA {args.tta} ({views} views), volume {args.slices}x{args.size}x{args.size}")
    print(f"   gitseg EnsembleModel.probs:   {args.slices / t_fused:8.1f} slices/s  ({t_fused:.1f} s); one-time "
          f"preparation of the {n} models {t_prepare:.2f} s", flush=True)
    if args.original:
        # What `gitseg predict` pays per case-day: the fused ensemble, probabilities mapped back to the
        # original size, and the masks (post-processing at 0.5 thresholds with the small-component rule).
        from ensemble.selection.postprocess import apply

        post = PostProcess(min_size=[25] * 3)
        start = time.perf_counter()
        probs, gate = model.predict({args.size: volume}, (args.original, args.original))
        apply(probs, post, gate)
        t_case = time.perf_counter() - start
        print(f"   one case-day {args.slices}x{args.original}x{args.original} (network {args.size} px), "
              f"probabilities at the original size and masks: {t_case:.2f} s", flush=True)
    start = time.perf_counter()
    naive = np.mean([naive_predict(net, volume, 3, 2, args.tta, device, True).astype(np.float32) for net in nets],
                    axis=0)
    t_naive = time.perf_counter() - start
    diff = float(np.abs(naive - fused).max())
    print(f"   naive loop, member by member: {args.slices / t_naive:8.1f} slices/s  ({t_naive:.1f} s)")
    print(f"   speed-up {t_naive / t_fused:.2f}x, max abs difference {diff:.1e}")
    assert diff < 2e-2, f"outputs differ by {diff}"


def synthetic_oof(n, depth, size, seed=0):
    """OOF-like probabilities: blurred organ boxes with noise and specks, and their truth."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    data = []
    for _ in range(n):
        gt = np.zeros((3, depth, size, size), bool)
        for c in range(3):
            z0, y0, x0 = rng.integers(0, depth // 2), *rng.integers(size // 8, size // 2, size=2)
            gt[c, z0:z0 + depth // 3, y0:y0 + size // 4, x0:x0 + size // 5] = True
        probs = ndimage.gaussian_filter(gt.astype(np.float32), (0, 1, 3, 3)) * rng.uniform(0.6, 1.0)
        probs += rng.uniform(0, 0.6, gt.shape) * (rng.uniform(size=gt.shape) < 0.002)
        data.append((np.clip(probs, 0, 1).astype(np.float16), gt))
    return data


def bench_tuning(args) -> None:
    if args.run:
        from ensemble.selection.members import load_refit, oof_volumes
        from gitseg.data.cache import Cache

        run = load_refit(args.run)
        configs = run.configurations
        cache = Cache(run.search.base["data"]["cache"])
        load = oof_volumes(configs, [1.0] * len(configs), cache)
        data = list(load())
        what = f"OOF of {len(configs)} refit configurations from {args.run}, {len(data)} case-days"
    else:
        data = synthetic_oof(args.volumes, args.slices, args.size)
        what = f"{len(data)} synthetic volumes {args.slices}x{args.size}x{args.size}"
    start = time.perf_counter()
    post, steps = tune(lambda: iter(data), log=lambda *_: None)
    t_fast = time.perf_counter() - start
    start = time.perf_counter()
    naive = tune_naive(lambda: iter(data))
    t_naive = time.perf_counter() - start
    same = naive == post
    scored = sum(s["masks_scored"] for s in steps)
    evaluated = sum(s["candidates_evaluated"] for s in steps)
    print(f"\n2. Post-processing search on {what}")
    print(f"   recompute every candidate (tune_naive): {t_naive:7.1f} s")
    print(f"   gitseg tune (sums per class, reuse):    {t_fast:7.1f} s   ({scored} of {evaluated} "
          f"(volume, class, candidate) masks scored)")
    print(f"   speed-up {t_naive / t_fast:.1f}x; same optimum: {same} ({post.to_dict()})")
    if not same:
        print(f"   naive found {naive.to_dict()}")
        sys.exit(1)


def print_ablation(folder) -> None:
    holdout = records.load(EnsembleManifest, Path(folder) / ENSEMBLE_MANIFEST).scores.holdout
    print(f"\n3. Holdout ablation of {folder} ({len(holdout.case_days)} case-days, kaggle convention)")
    for row in holdout.ablation:
        print(f"   {row.variant:<42} {row.score:.4f}  gain {row.gain:+.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", type=int, default=2)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--slices", type=int, default=96)
    parser.add_argument("--volumes", type=int, default=8,
                        help="synthetic OOF volumes for the tuning benchmark (0: skip it, unless --run)")
    parser.add_argument("--tta", default="hflip")
    parser.add_argument("--original", type=int, default=None,
                        help="also time one whole case-day at this original size (e.g. 266): predict + masks")
    parser.add_argument("--arch", default="Unet")
    parser.add_argument("--run", default=None, help="search folder: tune on its real OOF probabilities")
    parser.add_argument("--ensemble", default=None, help="ensemble folder: print its holdout ablation")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"device: {name}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    bench_prediction(args, device)
    if args.run or args.volumes:
        bench_tuning(args)
    if args.ensemble:
        print_ablation(args.ensemble)


if __name__ == "__main__":
    main()
