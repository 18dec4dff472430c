"""The training loop: `fit(cfg, report)` trains one fold, validates on whole volumes, checkpoints.

No Ray in here. `report(metrics, checkpoint_dir)` is a callback, so the same loop runs in a test,
from the CLI and as a Ray Train worker. Under torch.distributed (gloo or NCCL) the model is
wrapped in DDP, the sampler is distributed, each rank validates whole case-day volumes and the
per-volume statistics are gathered before the score is computed once: the same numbers as one
process. Checkpoints are written by rank 0 only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from gitseg.checkpoint import BEST, CHECKPOINT_FORMAT, LAST, default_device, load_checkpoint, save_checkpoint
from gitseg.config import Config, ConfigError, save_config, to_dict
from gitseg.config_checks import check_config
from gitseg.data.artefacts import Artefacts
from gitseg.data.cache import Cache
from gitseg.data.dataset import SliceDataset, build_augment
from gitseg.data.uwmgi import CLASSES
from gitseg.infer import autocast, predict_volume, prepare_for_inference
from gitseg.losses import LossMix
from gitseg.metrics import soft_dice, summarise, volume_stats
from gitseg.models import (
    build_model,
    check_input_size,
    check_parameters_used,
    split_outputs,
    unwrap,
)
from gitseg.progress import say
from gitseg.teacher import Teacher

if TYPE_CHECKING:
    from timm.utils import ModelEmaV3

# ---------------------------------------------------------------------------------------------
# Pure pieces




def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_ratio: float,
          schedule: str = "cosine", decay_fraction: float = 0.2) -> float:
    """Linear warm-up to base_lr, then down to min_ratio * base_lr at total_steps: a cosine over all
    the steps after warm-up, or (wsd: warm-up, stable, decay) constant until the last
    `decay_fraction` of all steps and a straight line from there. Why wsd: its decay can be placed
    at any budget, so a run cut short (an early-stopping rung, a compute budget) can still end
    cooled down, and a constant phase's score does not depend on how long the run was planned."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "wsd":
        decay_steps = max(1, round(decay_fraction * total_steps))
        progress = min(1.0, max(0.0, (step - (total_steps - decay_steps)) / decay_steps))
        return base_lr * (1 - (1 - min_ratio) * progress)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def distributed() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ---------------------------------------------------------------------------------------------
# Scoring a validation fold on whole volumes


def score_fold(model, cache: Cache, case_days: list[str], cfg: Config, device) -> dict:
    """Competition score on the original-size volumes of `case_days`, correct under DDP.

    Each rank predicts a share of whole volumes; the per-volume statistics are gathered so every
    rank summarises the same full list. Also `soft_dice`: per class 2 sum(p g) / (sum p + sum g)
    over all the volumes' probabilities, averaged over the classes. It needs no threshold, so it
    still ranks models that draw no mask at `train.threshold` yet (the competition score is 0 for
    all of them). Measured as a rung score for early stopping, it ranked no better than the score
    after a few epochs (BENCHMARKS.md, issue 15, Part A'): reported, not used to stop trials.
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
            p = probs[c]
            soft = (float(p[gt[c]].sum(dtype=np.float64)), float(p.sum(dtype=np.float64)), float(gt[c].sum()))
            stats.append((case_day, cls, counts, hd, soft))
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, stats)
        stats = [s for part in gathered for s in part]
    stats.sort(key=lambda s: (s[0], CLASSES.index(s[1])))  # same order whatever the rank split
    result = summarise([(cls, counts, hd) for _, cls, counts, hd, _ in stats], classes=CLASSES)
    result["soft_dice"] = soft_dice([(cls, soft) for _, cls, _, _, soft in stats])
    return result


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
# fit: setup, then per epoch train_one_epoch -> settle BatchNorm -> score_fold -> save_epoch


@dataclasses.dataclass
class Run:
    """What `fit` carries from one epoch to the next."""

    model: torch.nn.Module           # DDP-wrapped under torch.distributed
    optimizer: torch.optim.Optimizer
    dataset: SliceDataset            # its augment pipeline is reseeded every epoch
    loss_fn: LossMix
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    start_epoch: int = 0             # > 0 after a resume
    history: list[dict] = dataclasses.field(default_factory=list)  # every epoch's metrics
    best_score: float = -math.inf
    best_epoch: int = -1
    ema: ModelEmaV3 | None = None    # with train.ema: the averaged weights, validated and saved as "model"
    partial: dict | None = None      # resumed after a preemption: {epoch, steps, loss_sum, batches}
    stop: threading.Event | None = None  # set by SIGTERM (see `preemption`); None where none can be caught

    @property
    def evaluated(self) -> torch.nn.Module:
        """The weights that are validated, checkpointed as "model" and predicted with."""
        return self.ema.module if self.ema is not None else unwrap(self.model)


class Preempted(Exception):
    """SIGTERM arrived while training: the loop stopped between two steps and saved where it was in
    last.pt; the same command resumes from that step."""


@contextlib.contextmanager
def preemption():
    """While training, SIGTERM (a spot instance's notice, a scheduler's stop) sets an Event that the
    loop reads between steps instead of ending the process in the middle of one. Handlers can only
    be installed in the main thread: under Ray Train the loop runs in a worker thread, this yields
    None, and Ray's own fault tolerance restarts the trial from its last epoch's checkpoint."""
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_requested(run: Run) -> bool:
    """Whether to stop before the next step; under DDP every rank stops at the same step (the ones on a
    node that was not preempted too), or the others would wait forever in the next all-reduce."""
    if run.stop is None:
        return False
    _, world = distributed()
    if world == 1:
        return run.stop.is_set()
    flag = torch.tensor([float(run.stop.is_set())])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def make_ema(model: torch.nn.Module, decay: float) -> ModelEmaV3:
    """timm's EMA of parameters and BatchNorm statistics. Its decay warms up as 1 - (1 + step)^-3/4
    (timm's advice for short runs) up to `decay`: with a fixed 0.999 a run of a few hundred steps
    would validate weights still close to its random start. Every DDP rank updates it from the same
    (all-reduced) parameters, so the averaged weights agree; the statistics are settled per epoch."""
    # heavy: timm pulls in torchvision and torch._dynamo (about 1.6 s here), which the processes that
    # only import this module (a Tune trial's driver, Ray Train's controller, the CLI) never need.
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay, use_warmup=True, warmup_power=3 / 4)


def _comparable(cfg_dict: dict) -> dict:
    """The parts of a config that must match to resume a run (epochs may be extended)."""
    d = json.loads(json.dumps(cfg_dict))
    d.pop("out", None)
    d.pop("name", None)
    d["train"].pop("epochs", None)
    d["data"].pop("num_workers", None)
    return d


def can_resume(checkpoint_config: dict, cfg: Config) -> bool:
    """Whether a run of `cfg` may continue from a checkpoint saved with `checkpoint_config`."""
    return _comparable(checkpoint_config) == _comparable(to_dict(cfg))


def steps_per_epoch(samples: int, world: int, batch_size: int, cap: int | None) -> int:
    """Optimiser steps per epoch: full batches of each rank's share, at least one, at most `cap`."""
    per_rank = math.ceil(samples / world)
    steps = max(1, per_rank // batch_size) if per_rank > batch_size else 1
    return min(steps, cap) if cap else steps


def start_run(cfg: Config, cache: Cache, train_days: list[str], device, log) -> Run:
    """Model, optimizer and data of a run; resumed from `cfg.out/last.pt` when there is one."""
    rank, world = distributed()
    out = Path(cfg.out)
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, cfg.data.channels)
    check_input_size(model, cfg.data.channels, cache.size, cfg.model.arch)
    if world > 1 and cfg.model.options:  # DDP's own error about unused parameters does not say why
        check_parameters_used(model, cfg.data.channels, min(cache.size, 128), cfg.model)
    model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    ema = make_ema(model, cfg.train.ema) if cfg.train.ema else None
    resumed = {}
    if (out / LAST).is_file():
        state = load_checkpoint(out / LAST)
        if not can_resume(state["config"], cfg):
            raise ConfigError(f"{out} holds a run with a different configuration; choose another out folder "
                              f"or delete {out / LAST} to start over")
        if ema is not None:  # "model" is what was evaluated: the average; the optimiser's weights apart
            ema.module.load_state_dict(state["model"])
            unwrap(model).load_state_dict(state["train_model"])
        else:
            unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        resumed = dict(start_epoch=state["epoch"] + 1, history=list(state["history"]),
                       best_score=state["best_score"], best_epoch=state["best_epoch"], partial=state.get("partial"))
        partial = resumed["partial"]
        if rank == 0 and partial:
            log(f"fit: resuming {out} in epoch {partial['epoch'] + 1} after step {partial['steps']} "
                f"(it was preempted there)")
        elif rank == 0:
            log(f"fit: resuming {out} after epoch {state['epoch']}")
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    augment = build_augment(cfg.data.augment)
    teacher = Teacher(cfg.data.teacher) if cfg.data.teacher else None
    artefacts = Artefacts(cfg.data.artefacts, cfg.data.artefact_prob) if cfg.data.artefacts else None
    dataset = SliceDataset(cache, train_days, cfg.data.channels, cfg.data.stride, augment=augment, teacher=teacher,
                           artefacts=artefacts)
    steps = steps_per_epoch(len(dataset), world, cfg.train.batch_size, cfg.train.max_steps_per_epoch)
    return Run(model=model, optimizer=optimizer, dataset=dataset, loss_fn=LossMix(cfg.train.loss).to(device),
               steps_per_epoch=steps, total_steps=steps * cfg.train.epochs,
               warmup_steps=int(cfg.train.warmup_epochs * steps), ema=ema, **resumed)


def epoch_loader(run: Run, cfg: Config, epoch: int, device) -> DataLoader:
    """This epoch's shuffled loader, seeded so that a resumed run continues exactly as an unbroken one."""
    rank, world = distributed()
    epoch_seed = cfg.train.seed * 100_003 + epoch * 101 + rank
    seed_everything(epoch_seed)
    if run.dataset.augment is not None:
        run.dataset.augment.set_random_seed(epoch_seed)
    if world > 1:
        sampler = DistributedSampler(run.dataset, world, rank, shuffle=True, seed=cfg.train.seed, drop_last=True)
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(run.dataset, generator=torch.Generator().manual_seed(epoch_seed))
    return DataLoader(run.dataset, batch_size=cfg.train.batch_size, sampler=sampler,
                      num_workers=cfg.data.num_workers,
                      drop_last=len(run.dataset) // world > cfg.train.batch_size,
                      pin_memory=device.type == "cuda", persistent_workers=False)


def train_one_epoch(run: Run, loader: DataLoader, cfg: Config, epoch: int, device) -> dict:
    """At most `run.steps_per_epoch` optimiser steps; returns train_loss, lr and samples (all ranks),
    or, when a stop was requested, {"preempted_at": step, ...} with the sums so far."""
    rank, world = distributed()
    gate_loss = torch.nn.BCEWithLogitsLoss()
    soft_loss = torch.nn.BCEWithLogitsLoss()  # toward probabilities: the distillation term
    run.model.train()
    loss_sum = torch.zeros(2, dtype=torch.float64)  # (sum of batch losses, batches)
    samples, lr, skip = 0, cfg.train.lr, 0
    if run.partial and run.partial["epoch"] == epoch:  # resumed where a preemption stopped this epoch
        skip = run.partial["steps"]  # samples count only this process's steps: they make samples_per_s
        if rank == 0:  # the saved sums are the ranks' totals (save_preempted); the other ranks add theirs
            loss_sum = torch.tensor([run.partial["loss_sum"], run.partial["batches"]], dtype=torch.float64)
        run.partial = None
    for step, (images, targets) in enumerate(loader):
        if step >= run.steps_per_epoch:
            break
        if step < skip:  # trained before the stop; loading the batch keeps the data order and augmentation
            continue
        if stop_requested(run):
            return {"preempted_at": step, "loss_sum": loss_sum, "samples": samples}
        global_step = epoch * run.steps_per_epoch + step
        lr = lr_at(global_step, run.total_steps, run.warmup_steps, cfg.train.lr, cfg.train.min_lr_ratio,
                   cfg.train.schedule, cfg.train.decay_fraction)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels, soft = targets[:, :3], targets[:, 3:]  # soft: the teacher's probabilities, when distilling
        with autocast(device, cfg.train.amp):
            logits, gate_logits = split_outputs(run.model(images))
            loss, _ = run.loss_fn(logits, labels)
            if soft.shape[1]:
                w = cfg.train.teacher_weight
                loss = (1 - w) * loss + w * soft_loss(logits.float(), soft)
            if gate_logits is not None:
                loss = loss + cfg.train.gate_weight * gate_loss(gate_logits.float(), labels.amax(dim=(2, 3)))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch} step {step}; lower train.lr "
                                     f"or check the data")
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.train.grad_clip)
        run.optimizer.step()
        if run.ema is not None:
            run.ema.update(unwrap(run.model), step=global_step + 1)
        loss_sum += torch.tensor([loss.item(), 1.0], dtype=torch.float64)
        samples += len(images)
    if world > 1:
        totals = torch.tensor([loss_sum[0], loss_sum[1], samples], dtype=torch.float64)
        dist.all_reduce(totals)
        loss_sum, samples = totals[:2], int(totals[2])
    return {"train_loss": float(loss_sum[0] / max(loss_sum[1], 1)), "lr": lr, "samples": samples}


def settle_batchnorm(run: Run, loader: DataLoader, cfg: Config, device) -> None:
    """Make the BatchNorm statistics that are validated and saved the same on every rank; precise
    BN, when on, recomputes those of the model that is validated (the EMA's when on)."""
    _, world = distributed()
    if world > 1:
        # Each rank's BatchNorm statistics moved with its own batches; every rank takes rank 0's, so
        # that what is validated, saved and resumed is one model.
        for model in {id(m): m for m in (unwrap(run.model), run.evaluated)}.values():
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)
    if cfg.train.precise_bn:
        precise_bn(run.evaluated, loader, cfg.train.precise_bn, device, cfg.train.channels_last)


def save_epoch(run: Run, cfg: Config, cache: Cache, metrics: dict, improved: bool) -> None:
    """Rank 0: best.pt when the score improved, last.pt (with the optimizer) and a metrics.jsonl line."""
    save_state(run, cfg, cache, epoch=metrics["epoch"], metrics=metrics, files=(BEST, LAST) if improved else (LAST,))
    with open(Path(cfg.out) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")


def save_state(run: Run, cfg: Config, cache: Cache, epoch: int, metrics: dict, files: tuple[str, ...],
               partial: dict | None = None) -> None:
    """The checkpoint contract (gitseg.checkpoint) into `files` of the run folder; last.pt also gets
    what resuming needs: the optimizer, the optimiser's own weights under EMA, a preemption's step."""
    out = Path(cfg.out)
    state = {
        "format": CHECKPOINT_FORMAT, "model": run.evaluated.state_dict(), "config": to_dict(cfg),
        "fold": cfg.data.fold, "epoch": epoch, "metrics": metrics, "history": run.history,
        "best_score": run.best_score, "best_epoch": run.best_epoch,
        "preprocessing": {"size": cache.size, "channels": cfg.data.channels, "stride": cfg.data.stride,
                          "normalisation": cache.manifest["normalisation"], "classes": list(CLASSES)},
    }
    if BEST in files:
        save_checkpoint(out / BEST, state)
    if LAST in files:
        resume = {"optimizer": run.optimizer.state_dict()}
        if run.ema is not None:
            resume["train_model"] = unwrap(run.model).state_dict()
        if partial is not None:
            resume["partial"] = partial
        save_checkpoint(out / LAST, {**state, **resume})


def train_and_validate(run: Run, cfg: Config, cache: Cache, val_days: list[str], epoch: int, device, report,
                       log) -> None:
    """One epoch: train, settle BatchNorm, score the fold, save and report; a requested stop saves
    the step reached and raises Preempted."""
    rank, world = distributed()
    out, fold = Path(cfg.out), cfg.data.fold
    loader = epoch_loader(run, cfg, epoch, device)
    start = time.perf_counter()
    trained = train_one_epoch(run, loader, cfg, epoch, device)
    if "preempted_at" in trained:
        save_preempted(run, cfg, cache, epoch, trained)
        raise Preempted(f"stopped by SIGTERM in epoch {epoch + 1} before step {trained['preempted_at'] + 1}; "
                        f"{out / LAST} holds that step: run the same command again to resume from it")
    train_time = time.perf_counter() - start
    settle_batchnorm(run, loader, cfg, device)
    val_start = time.perf_counter()
    scores = score_fold(run.evaluated, cache, val_days, cfg, device)
    metrics = {
        "epoch": epoch, "train_loss": trained["train_loss"], **scores, "lr": trained["lr"],
        "epoch_time": time.perf_counter() - start, "val_time": time.perf_counter() - val_start,
        "samples_per_s": trained["samples"] / train_time if train_time > 0 else 0.0, "fold": fold,
    }
    improved = metrics["score"] > run.best_score
    if improved:
        run.best_score, run.best_epoch = metrics["score"], epoch
    metrics["best_score"], metrics["best_epoch"] = run.best_score, run.best_epoch
    run.history.append(metrics)
    if rank == 0:
        save_epoch(run, cfg, cache, metrics, improved)
        log(f"fit: fold {fold} epoch {epoch + 1}/{cfg.train.epochs}  loss {metrics['train_loss']:.4f}  "
            f"score {metrics['score']:.4f} (dice {metrics['dice']:.3f}, hausdorff {metrics['hausdorff']:.3f})  "
            f"{metrics['samples_per_s']:.0f} samples/s  {metrics['epoch_time']:.1f}s")
    if report is not None:
        report(metrics, str(out) if rank == 0 else None)


def save_preempted(run: Run, cfg: Config, cache: Cache, epoch: int, trained: dict) -> None:
    """last.pt at the step a stop was requested: the weights, the optimiser and the epoch's sums so
    far ("partial"), "epoch" still the last finished one, so that every reader sees the same run
    it saw before. Under DDP the sums are totalled over the ranks and rank 0 writes; the resumed run
    continues with rank 0's BatchNorm statistics on every rank (an unbroken run would have kept each
    rank's own until the epoch's end), so only a single-process run resumes bit for bit."""
    rank, world = distributed()
    totals = trained["loss_sum"].clone()
    if world > 1:
        dist.all_reduce(totals)
    if rank == 0:
        partial = {"epoch": epoch, "steps": trained["preempted_at"], "loss_sum": float(totals[0]),
                   "batches": float(totals[1])}
        save_state(run, cfg, cache, epoch=epoch - 1, metrics=run.history[-1] if run.history else {},
                   files=(LAST,), partial=partial)
    if world > 1:
        dist.barrier()  # nobody exits before the file is whole


def fit(cfg: Config, report=None, device=None, log=say) -> dict:
    """Train `cfg.data.fold`, validating each epoch; returns the best epoch's metrics.

    `report(metrics, checkpoint_dir)` is called on every rank after every epoch; checkpoint_dir
    is the run folder on rank 0 and None elsewhere. Restarted with the same `cfg.out`, training
    resumes after the last saved epoch; restarted after the last epoch, it trains nothing and
    reports the last epoch again, so that the caller still learns the run's final state.
    """
    rank, _ = distributed()
    device = torch.device(device) if device is not None else default_device()
    cache = Cache(cfg.data.cache)
    check_config(cfg, cache)
    out, fold = Path(cfg.out), cfg.data.fold
    train_days = cache.case_days(folds=[f for f in range(cache.manifest["folds"]) if f != fold])
    val_days = cache.case_days(folds=[fold])
    if not train_days or not val_days:
        raise ConfigError(f"data.fold {fold}: no training or validation case-days in {cache.root}")
    run = start_run(cfg, cache, train_days, device, log)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    with preemption() as run.stop:
        for epoch in range(run.start_epoch, cfg.train.epochs):
            train_and_validate(run, cfg, cache, val_days, epoch, device, report, log)
    if run.start_epoch >= cfg.train.epochs and report is not None:  # (start_epoch > 0: resumed, history restored)
        # A search driver killed after this run's last checkpoint was recorded restarts the trial
        # here; Tune keeps only what the restarted trial reports, so without this the trial would
        # end with no result at all.
        if rank == 0:
            log(f"fit: {out} already trained all {cfg.train.epochs} epochs; reporting the last one again")
        report(run.history[-1], str(out) if rank == 0 else None)
    if not run.history:
        raise ConfigError(f"train.epochs is {cfg.train.epochs}: nothing to train")
    return next((m for m in run.history if m["epoch"] == run.best_epoch), run.history[-1])
