"""Volume inference: gitseg's batched, fused-TTA engine vs a naive loop, same model and volume.

Baseline (what ttach-style wrappers do): one slice at a time, each TTA transform its own forward
pass, results un-transformed and averaged. gitseg: windows batched, all TTA views of a batch in
one forward, BatchNorm folded into the convolutions. Both use the same model (channels_last) and
the same precision (bf16 autocast on CUDA and on CPUs with native bf16, else fp32), and average
the sigmoid probabilities of the identity and horizontal-flip views; their outputs must agree.
Prints slices/s (best of --repeats runs each) and the ratio.

    python benchmarks/bench_infer.py [--device cpu|cuda] [--size 128] [--slices 64]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from gitseg.config import ModelConfig
from gitseg.data.dataset import window_indices
from gitseg.infer import autocast, predict_volume, prepare_for_inference, tta_views
from gitseg.models import build_model


@torch.inference_mode()
def naive_predict(model, volume, channels, stride, tta, device, amp):
    views = tta_views(tta)
    vol = torch.from_numpy(np.asarray(volume, np.float32)).to(device)
    out = []
    with autocast(device, amp, cpu=True):
        for idx in window_indices(len(volume), channels, stride):
            x = vol[torch.from_numpy(idx).to(device)][None].contiguous(memory_format=torch.channels_last)
            probs = [inverse(torch.sigmoid(model(view(x)).float())) for view, inverse in views]
            out.append((sum(probs) / len(probs))[0].to(torch.float16).cpu())
    return torch.stack(out, dim=1).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--arch", default="Unet")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=None, help="windows per forward (default: 4 CPU, 32 GPU)")
    parser.add_argument("--tta", default="hflip")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each; the fastest counts")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    # One model for both engines, in the memory format gitseg uses (channels_last).
    model = build_model(ModelConfig(arch=args.arch, encoder=args.encoder), in_channels=3).to(device).eval()
    model = model.to(memory_format=torch.channels_last)
    volume = np.random.default_rng(0).random((args.slices, args.size, args.size)).astype(np.float16)

    def timed(fn):
        """Best of `repeats` runs after a warm-up: the least disturbed by other load on the machine."""
        fn()
        times = []
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            result = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return result, min(times)

    naive, t_naive = timed(lambda: naive_predict(model, volume, 3, 2, args.tta, device, True))
    # Preparing a model (BatchNorm folding, checked against the original) happens once per model,
    # not per volume: timed on its own, and the engine is timed on the prepared model.
    start = time.perf_counter()
    ready = prepare_for_inference(model)
    t_prepare = time.perf_counter() - start
    fused, t_fused = timed(lambda: predict_volume(ready, volume, 3, 2, tta=args.tta, batch_size=args.batch_size,
                                                  device=device))
    diff = float(np.abs(naive.astype(np.float32) - fused.astype(np.float32)).max())
    assert diff < 1e-2, f"outputs differ by {diff}"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"device: {name}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{args.arch}/{args.encoder}, volume {args.slices}x{args.size}x{args.size}, 3-slice 2.5D, TTA {args.tta}")
    print(f"naive loop (1 slice, 1 forward per view): {args.slices / t_naive:8.1f} slices/s")
    print(f"gitseg fused batch (batch {args.batch_size or 'default'}):    {args.slices / t_fused:8.1f} slices/s")
    print(f"speed-up: {t_naive / t_fused:.2f}x  (max abs difference {diff:.1e}); one-time model preparation "
          f"{t_prepare:.2f} s, {t_prepare / t_fused:.1f} volumes' worth")


if __name__ == "__main__":
    main()
