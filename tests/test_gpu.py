"""CUDA paths (AMP bf16, channels_last, DDP-free fit, inference). Skipped where no GPU is present;
run on a lent GPU machine by benchmarks/gpu_check.sh."""

import numpy as np
import pytest
import torch
from conftest import tiny_config

from gitseg.checkpoint import BEST, load_checkpoint, model_from_checkpoint
from gitseg.config import ModelConfig
from gitseg.infer import predict_volume
from gitseg.models import build_model
from gitseg.train import fit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_fit_on_gpu_with_amp_and_channels_last(train_cache, tmp_path):
    cfg = tiny_config(train_cache, tmp_path / "gpu", epochs=2, max_steps_per_epoch=20)
    cfg.data.augment = 0.0  # the GPU image may lack albumentations
    assert cfg.train.amp and cfg.train.channels_last
    best = fit(cfg, log=print)
    assert np.isfinite(best["train_loss"]) and 0.0 <= best["score"] <= 1.0
    model = model_from_checkpoint(load_checkpoint(tmp_path / "gpu" / BEST))  # loads on the CPU
    assert next(model.parameters()).device.type == "cpu"


def test_gpu_bf16_inference_matches_cpu_fp32():
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="resnet18"), in_channels=3).eval()
    volume = np.random.default_rng(0).random((20, 128, 128)).astype(np.float16)
    cpu = predict_volume(model, volume, 3, 2, tta="hflip", device="cpu", amp=False).astype(np.float32)
    gpu = predict_volume(model.cuda(), volume, 3, 2, tta="hflip", device="cuda").astype(np.float32)
    assert gpu.shape == cpu.shape
    assert np.abs(gpu - cpu).mean() < 0.01 and np.abs(gpu - cpu).max() < 0.1
