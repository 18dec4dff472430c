"""Volume inference: 2.5D windows from a cached volume, batched, with TTA fused into the batch.

Output follows the probability contract (docs/ARCHITECTURE.md): `(3, D, H, W)` float16 in [0, 1], class
order large_bowel, small_bowel, stomach, at the original image size. Works for one model or a
weighted list; members and TTA views are averaged in probability space.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from gitseg.data.cache import window_indices, windows_per_forward
from gitseg.models import split_outputs

# A view and its inverse on (N, C, H, W) tensors. No vertical flip in the default set: anatomy
# has a fixed up-down orientation and vertical-flip TTA hurts on the real data.
TRANSFORMS = {
    "identity": (lambda x: x, lambda y: y),
    "hflip": (lambda x: x.flip(-1), lambda y: y.flip(-1)),
    "vflip": (lambda x: x.flip(-2), lambda y: y.flip(-2)),
    "hvflip": (lambda x: x.flip(-2, -1), lambda y: y.flip(-2, -1)),
}
TIMED_SLICES = 32      # slices per timing run (ms_per_slice): a few batches, enough to amortise the set-up
TIMING_REPEATS = 3     # the median of these runs is recorded
TTA_SETS = {
    "none": ("identity",),
    "hflip": ("identity", "hflip"),
    "flips": ("identity", "hflip", "vflip", "hvflip"),
}


def tta_views(name: str) -> list[tuple]:
    if name not in TTA_SETS:
        raise ValueError(f"unknown TTA set {name!r}; choose one of {', '.join(TTA_SETS)}")
    return [TRANSFORMS[t] for t in TTA_SETS[name]]


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(device: torch.device, enabled: bool = True, cpu: bool = False):
    """bf16 autocast on CUDA, and on CPUs with native bf16 when `cpu` is set; otherwise a no-op.

    Training passes cpu=False (fp32 on CPU); inference passes cpu=True: on an AVX512-BF16 CPU
    a Unet/resnet18 forward runs about 1.6x faster, probabilities within about 0.03.
    """
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if enabled and cpu and device.type == "cpu" and cpu_has_native_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _fold_pairs(model: nn.Module) -> int:
    """Fold each BatchNorm2d that directly follows a Conv2d into it (in place, eval statistics).

    Two patterns cover the smp decoders and ResNet-style encoders: a Conv2d followed by a
    BatchNorm2d inside a Sequential, and sibling attributes conv{i} / bn{i}.
    """
    folded = 0
    for parent in list(model.modules()):
        children = dict(parent.named_children())
        pairs = []
        if isinstance(parent, nn.Sequential):
            names = list(children)
            pairs += list(zip(names, names[1:]))
        pairs += [(f"conv{i}", f"bn{i}") for i in range(1, 4)]
        for conv_name, bn_name in pairs:
            conv, bn = children.get(conv_name), children.get(bn_name)
            if type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d:
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(parent, bn_name, nn.Identity())
                children[conv_name], children[bn_name] = None, None
                folded += 1
    return folded


def prepare_for_inference(model: nn.Module, channels_last: bool = True) -> nn.Module:
    """An inference copy of `model`: eval mode, BatchNorm folded into convolutions, channels_last.

    Folding removes about a fifth of the CPU time of a Unet/resnet18 forward. The copy is checked
    against the original on a random input and the plain copy is used if they disagree (a
    pattern the folding does not know). The model passed in is left untouched.
    """
    if getattr(model, "gitseg_inference_ready", False):
        return model
    chosen = copy.deepcopy(model).eval()
    if _fold_pairs(chosen):
        param = next(model.parameters())
        in_channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
        x = torch.randn(2, in_channels, 64, 64, device=param.device, generator=torch.Generator().manual_seed(0)
                        if param.device.type == "cpu" else None)
        was_training = model.training
        try:
            model.eval()
            with torch.inference_mode():
                ref, _ = split_outputs(model(x))
                out, _ = split_outputs(chosen(x))
        finally:
            model.train(was_training)
        if not torch.allclose(out, ref, rtol=1e-3, atol=1e-3):
            chosen = copy.deepcopy(model).eval()  # a pattern the folding got wrong: keep the plain model
    if channels_last:
        chosen = chosen.to(memory_format=torch.channels_last)
    chosen.gitseg_inference_ready = True
    return chosen


def view_probs(models: Sequence[nn.Module], weights: Sequence[float], x: torch.Tensor, views, each=None):
    """Per TTA view, the models' weighted mean probabilities `(B, 3, S, S)`, mapped back by the view's
    inverse, and their gate probabilities `(B, 3)` (None unless every model has a gate head); all
    views go through each model in one forward. `each(probs)`, if given, sees every model's own
    probabilities per view (mapped back, unweighted) in turn."""
    batch = torch.cat([view(x) for view, _ in views])  # (T*B, C, S, S)
    total, gate_total = None, []
    for model, weight in zip(models, weights):
        logits, gate_logits = split_outputs(model(batch))
        own = [inverse(p) for (_, inverse), p in zip(views, torch.sigmoid(logits.float()).chunk(len(views)))]
        if each is not None:
            each(own)
        probs = [weight * p for p in own]
        total = probs if total is None else [t + p for t, p in zip(total, probs)]
        if gate_total is not None and gate_logits is not None:
            # Organ presence does not change under a flip: a view's gate needs no inverse.
            gates = [weight * g for g in torch.sigmoid(gate_logits.float()).chunk(len(views))]
            gate_total = gates if not gate_total else [t + g for t, g in zip(gate_total, gates)]
        else:
            gate_total = None
    norm = float(sum(weights))
    return [t / norm for t in total], [g / norm for g in gate_total] if gate_total else None


def default_batch_size(device: torch.device, size: int = 128) -> int:
    """Windows per forward. On CPU about 128 x 128 x 8 input pixels: larger batches spill the caches
    and run slower per slice, smaller ones leave the cores idle between forwards (2 cores, Unet/resnet18
    with flip TTA, ms per slice at batch 4/8/16/32: 64 px 7.0/5.3/4.3/4.6, 128 px 21.0/16.4/17.2/18.5,
    256 px 65/71/71/77)."""
    return windows_per_forward(size, gpu=device.type == "cuda")


def predict_volume(models, volume: np.ndarray, channels: int, stride: int, out_size=None, tta: str = "hflip",
                   weights=None, batch_size: int | None = None, device=None, amp: bool = True,
                   channels_last: bool = True) -> np.ndarray:
    """Probabilities float16 `(3, D, H, W)` for one cached volume `(D, S, S)`.

    `models` is a model or a list (with optional `weights`); `out_size` `(H, W)` maps back to the
    original image size (None keeps S x S). Models are used through `prepare_for_inference`
    (pass prepared models to skip that step when predicting many volumes).
    """
    return predict_volume_sets(models, volume, channels, stride, (tta,), out_size, weights, batch_size, device, amp,
                               channels_last)[0][tta]


def predict_volume_sets(models, volume: np.ndarray, channels: int, stride: int, tta_sets=("none", "hflip"),
                        out_size=None, weights=None, batch_size: int | None = None, device=None, amp: bool = True,
                        channels_last: bool = True, votes=None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """`predict_volume` for several TTA sets at once: ({set: probabilities float16 `(3, D, H, W)`},
    {set: gate probabilities float16 `(3, D)`}); the second is empty unless every model has a gate head.

    Each view of the sets' union is computed once, so the refit's out-of-fold files with and
    without TTA cost the forward passes of the larger set alone. `votes` (with one TTA set: an
    `ensemble.predict.review.Votes`, or anything with its `thresholds` and `add(start, masks)`)
    receives each model's own masks at the thresholds, at the output size: the members' vote for the
    review list, from the same forward passes.
    """
    models = list(models) if isinstance(models, (list, tuple)) else [models]
    weights = list(weights) if weights is not None else [1.0] * len(models)
    if len(weights) != len(models) or sum(weights) <= 0:
        raise ValueError("give one positive weight per model")
    device = torch.device(device) if device is not None else next(models[0].parameters()).device
    batch_size = batch_size or default_batch_size(device, volume.shape[-1])
    for name in tta_sets:
        tta_views(name)  # a clear error for an unknown set
    names = list(dict.fromkeys(v for name in tta_sets for v in TTA_SETS[name]))  # the union, in order
    views = [TRANSFORMS[v] for v in names]
    depth, size = volume.shape[0], volume.shape[-1]
    out_h, out_w = out_size if out_size is not None else volume.shape[1:]
    windows = torch.from_numpy(window_indices(depth, channels, stride)).to(device)
    slices = torch.from_numpy(np.asarray(volume, dtype=np.float32)).to(device)  # (D, S, S)
    probs = {name: np.empty((3, depth, out_h, out_w), dtype=np.float16) for name in tta_sets}
    gates = {name: np.empty((3, depth), dtype=np.float16) for name in tta_sets}
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    models = [prepare_for_inference(m, channels_last) for m in models]
    if votes is not None:
        if len(tta_sets) != 1:
            raise ValueError("votes need exactly one TTA set (the ensemble's)")
        thresholds = torch.as_tensor(votes.thresholds, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        voted = [names.index(v) for v in TTA_SETS[tta_sets[0]]]
        votes.members += len(models)
    with torch.inference_mode(), autocast(device, amp, cpu=True):
        for start in range(0, depth, batch_size):
            x = slices[windows[start:start + batch_size]].contiguous(memory_format=fmt)  # (B, C, S, S)

            def vote(own, start=start):  # one model's views: its mean over the set, resized, thresholded
                p = sum(own[i] for i in voted) / len(voted)
                if (out_h, out_w) != (size, size):
                    p = F.interpolate(p, size=(out_h, out_w), mode="bilinear", align_corners=False)
                votes.add(start, (p >= thresholds).permute(1, 0, 2, 3).cpu().numpy())

            masks, gate = view_probs(models, weights, x, views, each=None if votes is None else vote)
            per_view = dict(zip(names, masks))  # each (B, 3, S, S)
            for name in list(gates):
                if gate is None:
                    del gates[name]
                else:
                    g = sum(gate[names.index(v)] for v in TTA_SETS[name]) / len(TTA_SETS[name])  # (B, 3)
                    gates[name][:, start:start + len(x)] = g.clamp_(0, 1).T.to(torch.float16).cpu().numpy()
            for name, out in probs.items():
                p = sum(per_view[v] for v in TTA_SETS[name]) / len(TTA_SETS[name])
                if (out_h, out_w) != (size, size):
                    p = F.interpolate(p, size=(out_h, out_w), mode="bilinear", align_corners=False)
                out[:, start:start + len(x)] = p.clamp_(0, 1).permute(1, 0, 2, 3).to(torch.float16).cpu().numpy()
    return probs, gates


# ---------------------------------------------------------------------------------------------
# Measured latency (the ensemble's latency front, the multi-objective search)


@functools.cache
def device_name(device: torch.device) -> str:
    """What the times were measured on, in words."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return (f"{model}, {torch.get_num_threads()} threads, "
            f"{'bf16 autocast' if cpu_has_native_bf16() else 'fp32 (no native bf16)'}")


def ms_per_slice(network, volume: np.ndarray, channels: int, stride: int, out_size, tta: str, device) -> float:
    """Median wall milliseconds per slice of `predict_volume` (the fused engine, mapped back to the
    original size) over the first TIMED_SLICES slices of `volume`, after one warm-up run."""
    volume = np.asarray(volume[:TIMED_SLICES])
    predict_volume(network, volume[:8], channels, stride, out_size=out_size, tta=tta, device=device)
    times = []
    for _ in range(TIMING_REPEATS):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        predict_volume(network, volume, channels, stride, out_size=out_size, tta=tta, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times)) / len(volume)
