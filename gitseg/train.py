"""The training loop: `fit(cfg, report)` trains one fold, validates on whole volumes, checkpoints.

No Ray in here. `report(metrics, checkpoint_dir)` is a callback, so the same loop runs in a test,
from the CLI and as a Ray Train worker. Under torch.distributed (gloo or NCCL) the model is
wrapped in DDP, the sampler is distributed, each rank validates whole case-day volumes and the
per-volume statistics are gathered before the score is computed once: the same numbers as one
process. Checkpoints are written by rank 0 only.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from gitseg.config import Config, ConfigError, from_dict, save_config, to_dict
from gitseg.data.dataset import Cache, SliceDataset, build_augment, window_indices
from gitseg.data.uwmgi import CLASSES
from gitseg.infer import autocast, predict_volume, prepare_for_inference
from gitseg.losses import LossMix, check_loss_terms
from gitseg.metrics import summarise, volume_stats
from gitseg.models import build_model, check_input_size, check_model_names, split_outputs, unwrap
from gitseg.progress import say

CHECKPOINT_FORMAT = 1
LAST, BEST = "last.pt", "best.pt"


# ---------------------------------------------------------------------------------------------
# Pure pieces


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_ratio: float) -> float:
    """Linear warm-up to base_lr, then cosine decay to min_ratio * base_lr at total_steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def distributed() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def validate_config(cfg: Config, cache: Cache) -> None:
    """Everything that can be checked before training starts, with errors that name the key."""
    check_model_names(cfg.model)
    check_loss_terms(cfg.train.loss)
    try:
        window_indices(1, cfg.data.channels, cfg.data.stride)
    except ValueError as exc:
        raise ConfigError(f"data.channels/data.stride: {exc}") from None
    folds = cache.manifest["folds"]
    if not 0 <= cfg.data.fold < folds:
        raise ConfigError(f"data.fold: {cfg.data.fold} is not a fold of {cache.root} (it has folds 0..{folds - 1})")
    for key, value, low in (("train.epochs", cfg.train.epochs, 1), ("train.batch_size", cfg.train.batch_size, 1),
                            ("train.val_batch_size", cfg.train.val_batch_size or 1, 1),
                            ("train.precise_bn", cfg.train.precise_bn, 0)):
        if value < low:
            raise ConfigError(f"{key} must be at least {low} (got {value})")
    if cfg.train.lr <= 0:
        raise ConfigError(f"train.lr must be positive (got {cfg.train.lr})")
    if not 0 < cfg.train.threshold < 1:
        raise ConfigError(f"train.threshold must be in (0, 1) (got {cfg.train.threshold})")


# ---------------------------------------------------------------------------------------------
# Checkpoints (flat schema, rank 0, atomic, weights_only loadable)


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a gitseg checkpoint of format {CHECKPOINT_FORMAT}")
    return state


def model_from_checkpoint(state: dict, device="cpu") -> torch.nn.Module:
    """Rebuild the model from a checkpoint alone (config + weights)."""
    cfg = from_dict(Config, state["config"])
    model = build_model(cfg.model, state["preprocessing"]["channels"])
    model.load_state_dict(state["model"])
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# Validation on whole volumes


def validate(model, cache: Cache, case_days: list[str], cfg: Config, device) -> dict:
    """Competition score on the original-size volumes of `case_days`, correct under DDP.

    Each rank predicts a share of whole volumes; the per-volume statistics are gathered so every
    rank summarises the same full list.
    """
    rank, world = distributed()
    stats = []
    ready = prepare_for_inference(unwrap(model), cfg.train.channels_last)
    for case_day in case_days[rank::world]:
        entry = cache.entries[case_day]
        probs = predict_volume(ready, cache.image(case_day), cfg.data.channels, cfg.data.stride,
                               out_size=(entry["height"], entry["width"]), tta=cfg.train.val_tta,
                               batch_size=cfg.train.val_batch_size, device=device, amp=cfg.train.amp,
                               channels_last=cfg.train.channels_last)
        masks = probs >= cfg.train.threshold
        gt = cache.original_masks(case_day)
        for c, cls in enumerate(CLASSES):
            counts, hd = volume_stats(masks[c], gt[c])
            stats.append((case_day, cls, counts, hd))
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, stats)
        stats = [s for part in gathered for s in part]
    stats.sort(key=lambda s: (s[0], CLASSES.index(s[1])))  # same order whatever the rank split
    return summarise([(cls, counts, hd) for _, cls, counts, hd in stats], classes=CLASSES)


def precise_bn(model: torch.nn.Module, loader, batches: int, device, channels_last: bool) -> None:
    """Replace BatchNorm's running statistics by their plain average over `batches` training
    batches (the loader's first ones), averaged over the ranks under DDP.

    Why: the running statistics are an exponential average of the last ~10 batches, taken while
    the weights moved under them; at a high learning rate they trail the weights and the epoch's
    validation score swings with them. Recomputed, the scores of early epochs rank configurations
    far better (BENCHMARKS.md, val_noise: mean Spearman 0.15 -> 0.57 over epochs 1-8), which is
    what ASHA's early rungs act on.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average of the batches that follow
    model.train()
    with torch.no_grad():
        for i, (images, _) in enumerate(loader):
            if i >= batches:
                break
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            model(images)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    _, world = distributed()
    if world > 1:
        for m in norms:
            for buffer in (m.running_mean, m.running_var):
                dist.all_reduce(buffer)
                buffer /= world


# ---------------------------------------------------------------------------------------------
# fit


def _comparable(cfg_dict: dict) -> dict:
    """The parts of a config that must match to resume a run (epochs may be extended)."""
    d = json.loads(json.dumps(cfg_dict))
    d.pop("out", None)
    d.pop("name", None)
    d["train"].pop("epochs", None)
    d["data"].pop("num_workers", None)
    return d


def fit(cfg: Config, report=None, device=None, log=say) -> dict:
    """Train `cfg.data.fold`, validating each epoch; returns the best epoch's metrics.

    `report(metrics, checkpoint_dir)` is called on every rank after every epoch; checkpoint_dir
    is the run folder on rank 0 and None elsewhere. Restarted with the same `cfg.out`, training
    resumes after the last saved epoch; restarted after the last epoch, it trains nothing and
    reports the last epoch again, so that the caller still learns the run's final state.
    """
    rank, world = distributed()
    device = torch.device(device) if device is not None else default_device()
    cache = Cache(cfg.data.cache)
    validate_config(cfg, cache)
    out = Path(cfg.out)
    fold = cfg.data.fold
    train_days = cache.case_days(folds=[f for f in range(cache.manifest["folds"]) if f != fold])
    val_days = cache.case_days(folds=[fold])
    if not train_days or not val_days:
        raise ConfigError(f"data.fold {fold}: no training or validation case-days in {cache.root}")

    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, cfg.data.channels)
    check_input_size(model, cfg.data.channels, cache.size, cfg.model.arch)
    model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)

    start_epoch, history, best = 0, [], {"score": -math.inf, "epoch": -1}
    if (out / LAST).is_file():
        state = load_checkpoint(out / LAST)
        if _comparable(state["config"]) != _comparable(to_dict(cfg)):
            raise ConfigError(f"{out} holds a run with a different configuration; choose another out folder "
                              f"or delete {out / LAST} to start over")
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = state["epoch"] + 1, list(state["history"])
        best = {"score": state["best_score"], "epoch": state["best_epoch"]}
        if rank == 0:
            log(f"fit: resuming {out} after epoch {state['epoch']}")
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    augment = build_augment(cfg.data.augment)
    dataset = SliceDataset(cache, train_days, cfg.data.channels, cfg.data.stride, augment=augment)
    loss_fn = LossMix(cfg.train.loss).to(device)
    gate_loss = torch.nn.BCEWithLogitsLoss()
    per_rank = math.ceil(len(dataset) / world)
    steps_per_epoch = max(1, per_rank // cfg.train.batch_size) if per_rank > cfg.train.batch_size else 1
    if cfg.train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)
    total_steps = steps_per_epoch * cfg.train.epochs
    warmup_steps = int(cfg.train.warmup_epochs * steps_per_epoch)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    for epoch in range(start_epoch, cfg.train.epochs):
        # Reseeding per epoch (and rank) makes a resumed run continue exactly as an unbroken one.
        epoch_seed = cfg.train.seed * 100_003 + epoch * 101 + rank
        seed_everything(epoch_seed)
        if augment is not None:
            augment.set_random_seed(epoch_seed)
        if world > 1:
            sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=cfg.train.seed, drop_last=True)
            sampler.set_epoch(epoch)
        else:
            sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(epoch_seed))
        loader = DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler,
                            num_workers=cfg.data.num_workers, drop_last=len(dataset) // world > cfg.train.batch_size,
                            pin_memory=device.type == "cuda", persistent_workers=False)
        model.train()
        start = time.perf_counter()
        loss_sum = torch.zeros(2, dtype=torch.float64)  # (sum of batch losses, batches)
        samples = 0
        for step, (images, targets) in enumerate(loader):
            if step >= steps_per_epoch:
                break
            lr = lr_at(epoch * steps_per_epoch + step, total_steps, warmup_steps, cfg.train.lr,
                       cfg.train.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            if cfg.train.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device, cfg.train.amp):
                logits, gate_logits = split_outputs(model(images))
                loss, _ = loss_fn(logits, targets)
                if gate_logits is not None:
                    loss = loss + cfg.train.gate_weight * gate_loss(gate_logits.float(), targets.amax(dim=(2, 3)))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch} step {step}; lower train.lr "
                                         f"or check the data")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            loss_sum += torch.tensor([loss.item(), 1.0], dtype=torch.float64)
            samples += len(images)
        train_time = time.perf_counter() - start
        if world > 1:
            totals = torch.tensor([loss_sum[0], loss_sum[1], samples], dtype=torch.float64)
            dist.all_reduce(totals)
            loss_sum, samples = totals[:2], int(totals[2])
        if cfg.train.precise_bn:
            precise_bn(unwrap(model), loader, cfg.train.precise_bn, device, cfg.train.channels_last)
        elif world > 1:
            # Each rank's BatchNorm statistics moved with its own last batch; validate (and save) rank 0's.
            for buffer in unwrap(model).buffers():
                dist.broadcast(buffer, 0)
        val_start = time.perf_counter()
        scores = validate(model, cache, val_days, cfg, device)
        metrics = {
            "epoch": epoch,
            "train_loss": float(loss_sum[0] / max(loss_sum[1], 1)),
            **scores,
            "lr": lr,
            "epoch_time": time.perf_counter() - start,
            "val_time": time.perf_counter() - val_start,
            "samples_per_s": samples / train_time if train_time > 0 else 0.0,
            "fold": fold,
        }
        improved = metrics["score"] > best["score"]
        if improved:
            best = {"score": metrics["score"], "epoch": epoch}
        metrics["best_score"], metrics["best_epoch"] = best["score"], best["epoch"]
        history.append(metrics)
        if rank == 0:
            state = {
                "format": CHECKPOINT_FORMAT, "model": unwrap(model).state_dict(), "config": to_dict(cfg),
                "fold": fold, "epoch": epoch, "metrics": metrics, "history": history,
                "best_score": best["score"], "best_epoch": best["epoch"],
                "preprocessing": {"size": cache.size, "channels": cfg.data.channels, "stride": cfg.data.stride,
                                  "normalisation": cache.manifest["normalisation"], "classes": list(CLASSES)},
            }
            if improved:
                save_checkpoint(out / BEST, state)
            save_checkpoint(out / LAST, {**state, "optimizer": optimizer.state_dict()})
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            log(f"fit: fold {fold} epoch {epoch + 1}/{cfg.train.epochs}  loss {metrics['train_loss']:.4f}  "
                f"score {metrics['score']:.4f} (dice {metrics['dice']:.3f}, hausdorff {metrics['hausdorff']:.3f})  "
                f"{metrics['samples_per_s']:.0f} samples/s  {metrics['epoch_time']:.1f}s")
        if report is not None:
            report(metrics, str(out) if rank == 0 else None)
    if start_epoch >= cfg.train.epochs and report is not None:  # (start_epoch > 0: resumed, history restored)
        # A search driver killed after this run's last checkpoint was recorded restarts the trial
        # here; Tune keeps only what the restarted trial reports, so without this the trial would
        # end with no result at all.
        if rank == 0:
            log(f"fit: {out} already trained all {cfg.train.epochs} epochs; reporting the last one again")
        report(history[-1], str(out) if rank == 0 else None)
    if not history:
        raise ConfigError(f"train.epochs is {cfg.train.epochs}: nothing to train")
    best_metrics = next((m for m in history if m["epoch"] == best["epoch"]), history[-1])
    return best_metrics
