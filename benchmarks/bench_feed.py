"""Is training data-bound? The real training step fed by the real loader vs by ready tensors.

    python benchmarks/bench_feed.py --cache CACHE [--config configs/uwmgi.yaml] [--workers 0 2 4 8]

Both arms run gitseg.train.train_one_epoch (the same model, optimiser, loss, AMP and memory format,
steps capped by --steps):
- baseline, "ready tensors": batches of the real shape and dtype made once and already on the
  device, so no loading, augmentation or host-to-device copy happens: the step's own speed;
- the real loader (gitseg.train.epoch_loader over the cache, with the config's augmentation) at
  each number of DataLoader worker processes in --workers.
Printed: samples/s of each once its first batch is in (the workers' start, paid once per epoch in
training, is printed apart) and its ratio to the ready tensors. A ratio near 1 means the loader
keeps the device fed at that many workers; the smallest such count is the one to configure.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gitseg.config import load_config  # noqa: E402
from gitseg.data.cache import Cache  # noqa: E402
from gitseg.train import epoch_loader, start_run, train_one_epoch  # noqa: E402


def timed_epoch(run, batches, cfg, device) -> tuple[float, float]:
    """(samples per second once the first batch is in, seconds to the first batch) of one capped
    epoch, after a 2-step warm-up epoch on the same feed. Training makes a new loader each epoch, so
    the workers' start is paid once per epoch of thousands of steps: it is reported, not mixed in."""
    steps = run.steps_per_epoch
    run.steps_per_epoch = 2
    train_one_epoch(run, batches(), cfg, 0, device)
    run.steps_per_epoch = steps
    first = {}

    def timed():
        for i, batch in enumerate(batches()):
            if i == 0:
                first["t"] = time.perf_counter()  # its step is timed, its loading is not
            yield batch

    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = train_one_epoch(run, timed(), cfg, 0, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter()
    return out["samples"] / (end - first["t"]), first["t"] - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, help="a prepared cache (gitseg prepare)")
    parser.add_argument("--config", default="configs/uwmgi.yaml", help="experiment config (model, batch, augment)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=30, help="timed optimiser steps per arm")
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 2, 4, 8])
    args = parser.parse_args(argv)
    cfg = load_config(args.config, [*args.set, f"data.cache={args.cache}", "model.encoder_weights=null",
                                    f"train.max_steps_per_epoch={args.steps}", "out=runs/bench_feed"])
    device = torch.device(args.device)
    cache = Cache(args.cache)
    days = cache.case_days(folds=[f for f in range(cache.manifest["folds"]) if f != cfg.data.fold])
    run = start_run(cfg, cache, days, device, print)

    images, targets = next(iter(epoch_loader(run, cfg, 0, device)))
    ready = [(images.to(device), targets.to(device))] * run.steps_per_epoch
    base, _ = timed_epoch(run, lambda: iter(ready), cfg, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{cfg.model.arch}/{cfg.model.encoder}, batch {cfg.train.batch_size} x {tuple(images.shape[1:])}, "
          f"AMP {cfg.train.amp}, augment {cfg.data.augment}, on {name}, {run.steps_per_epoch} steps per arm")
    print(f"  ready tensors (baseline)   {base:8.1f} samples/s")
    for workers in args.workers:
        cfg.data.num_workers = workers
        speed, startup = timed_epoch(run, lambda: iter(epoch_loader(run, cfg, 0, device)), cfg, device)
        print(f"  real loader, {workers:2d} workers   {speed:8.1f} samples/s   {speed / base:5.2f} x baseline   "
              f"first batch after {startup:.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
