"""Training throughput: samples/s of the fit() step on the demo configuration, and its variants.

The demo configuration (Unet/resnet18, 3-slice 2.5D, bce+dice, AdamW) measured over a fixed
number of optimiser steps after warm-up, contiguous vs channels_last; on CUDA also fp32 vs bf16
autocast, with peak memory. The baseline is fp32 contiguous, measured in the same run.

    python benchmarks/bench_train.py [--device cpu|cuda] [--size 96] [--batch-size 16] [--steps 10]
"""

from __future__ import annotations

import argparse
import itertools
import platform
import time

import torch

from gitseg.config import LossTerm, ModelConfig
from gitseg.infer import autocast
from gitseg.losses import LossMix
from gitseg.models import build_model


def run(device, size, batch, steps, arch, encoder, amp, channels_last):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, encoder=encoder), in_channels=3).to(device).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = LossMix([LossTerm("bce", 0.5), LossTerm("dice", 0.5)])
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = (torch.rand(batch, 3, size, size, device=device) > 0.8).float()

    def step():
        with autocast(device, amp):
            loss, _ = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = steps * batch / (time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return rate, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--arch", default="Unet")
    parser.add_argument("--encoder", default="resnet18")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"device: {name}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{args.arch}/{args.encoder}, batch {args.batch_size}, {args.size}x{args.size}, 3-slice 2.5D, bce+dice")
    base = None
    amps = (False, True) if device.type == "cuda" else (False,)  # autocast is CUDA-only in gitseg
    for amp, cl in itertools.product(amps, (False, True)):
        rate, peak = run(device, args.size, args.batch_size, args.steps, args.arch, args.encoder, amp, cl)
        base = base or rate
        memory = f"peak {peak:5.2f} GiB  " if device.type == "cuda" else ""
        print(f"{'bf16' if amp else 'fp32'} {'channels_last' if cl else 'contiguous   '}: {rate:9.1f} samples/s  "
              f"{memory}({rate / base:.2f}x fp32 contiguous)")


if __name__ == "__main__":
    main()
