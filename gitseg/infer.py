"""Volume inference: 2.5D windows from a cached volume, batched, with TTA fused into the batch.

Output follows the probability contract of DESIGN.md: `(3, D, H, W)` float16 in [0, 1], class
order large_bowel, small_bowel, stomach, at the original image size. Works for one model or a
weighted list; members and TTA views are averaged in probability space.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gitseg.data.dataset import window_indices
from gitseg.models import split_outputs

# A view and its inverse on (N, C, H, W) tensors. No vertical flip in the default set: anatomy
# has a fixed up-down orientation and vertical-flip TTA hurts on the real data.
TRANSFORMS = {
    "identity": (lambda x: x, lambda y: y),
    "hflip": (lambda x: x.flip(-1), lambda y: y.flip(-1)),
    "vflip": (lambda x: x.flip(-2), lambda y: y.flip(-2)),
    "hvflip": (lambda x: x.flip(-2, -1), lambda y: y.flip(-2, -1)),
}
TTA_SETS = {
    "none": ("identity",),
    "hflip": ("identity", "hflip"),
    "flips": ("identity", "hflip", "vflip", "hvflip"),
}


def tta_views(name: str) -> list[tuple]:
    if name not in TTA_SETS:
        raise ValueError(f"unknown TTA set {name!r}; choose one of {', '.join(TTA_SETS)}")
    return [TRANSFORMS[t] for t in TTA_SETS[name]]


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA; a no-op elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def eval_mode(models: Sequence[nn.Module]):
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def predict_windows(models: Sequence[nn.Module], weights: Sequence[float], x: torch.Tensor, views) -> torch.Tensor:
    """Probabilities `(B, 3, S, S)` for windows `x` `(B, C, S, S)`: every TTA view in one forward per model."""
    batch = torch.cat([view(x) for view, _ in views])  # (T*B, C, S, S)
    total = None
    for model, weight in zip(models, weights):
        logits, _ = split_outputs(model(batch))
        probs = torch.sigmoid(logits.float()).chunk(len(views))
        mean = sum(inverse(p) for (_, inverse), p in zip(views, probs)) / len(views)
        total = weight * mean if total is None else total + weight * mean
    return total / float(sum(weights))


@torch.inference_mode()
def predict_volume(models, volume: np.ndarray, channels: int, stride: int, out_size=None, tta: str = "hflip",
                   weights=None, batch_size: int = 32, device=None, amp: bool = True,
                   channels_last: bool = True) -> np.ndarray:
    """Probabilities float16 `(3, D, H, W)` for one cached volume `(D, S, S)`.

    `models` is a model or a list (with optional `weights`); `out_size` `(H, W)` maps back to the
    original image size (None keeps S x S). Models are put in eval mode for the call.
    """
    models = list(models) if isinstance(models, (list, tuple)) else [models]
    weights = list(weights) if weights is not None else [1.0] * len(models)
    if len(weights) != len(models) or sum(weights) <= 0:
        raise ValueError("give one positive weight per model")
    device = torch.device(device) if device is not None else next(models[0].parameters()).device
    views = tta_views(tta)
    depth, size = volume.shape[0], volume.shape[-1]
    out_h, out_w = out_size if out_size is not None else volume.shape[1:]
    windows = torch.from_numpy(window_indices(depth, channels, stride)).to(device)
    slices = torch.from_numpy(np.asarray(volume, dtype=np.float32)).to(device)  # (D, S, S)
    probs = np.empty((3, depth, out_h, out_w), dtype=np.float16)
    fmt = torch.channels_last if channels_last and device.type == "cuda" else torch.contiguous_format
    with eval_mode(models), autocast(device, amp):
        for start in range(0, depth, batch_size):
            x = slices[windows[start:start + batch_size]].contiguous(memory_format=fmt)  # (B, C, S, S)
            p = predict_windows(models, weights, x, views)  # (B, 3, S, S)
            if (out_h, out_w) != (size, size):
                p = F.interpolate(p, size=(out_h, out_w), mode="bilinear", align_corners=False)
            probs[:, start:start + len(x)] = p.clamp_(0, 1).permute(1, 0, 2, 3).to(torch.float16).cpu().numpy()
    return probs
