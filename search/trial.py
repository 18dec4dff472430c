"""Ray adapters at the edge of `gitseg.train.fit`: the Ray Train worker and the Tune trial driver.

A Tune trial runs `trial_driver`, which launches a Ray Train `TorchTrainer` (Train V2 API) whose
workers run `train_worker`: restore the run's latest checkpoint, call `fit` with a `report`
callback that forwards each epoch to `ray.train.report`. `TuneReportCallback` passes the metrics
on to Tune, where ASHA reads `epochs_done`. Restarted with the same storage path and name, a
Train run resumes from its latest checkpoint (a restored trial continues where it stopped).
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import pyarrow.fs
import torch.distributed as dist

from gitseg.checkpoint import BEST, LAST, load_checkpoint, model_from_checkpoint
from gitseg.config import Config, from_dict, to_dict
from gitseg.data.cache import Cache
from gitseg.files import scratch_folder
from gitseg.infer import device_name, ms_per_slice, prepare_for_inference
from gitseg.models import build_model
from gitseg.oof import OOF_FOLDER, write_oof
from gitseg.train import can_resume, fit
from search.space import decode, trial_config
from search.storage import filesystem

RESTORED_FILES = (LAST, BEST, "metrics.jsonl", "config.yaml")


def _restore_latest(out: Path, cfg: Config, start_from: str | None = None, log=print) -> None:
    """Copy the Train run's latest checkpoint into this worker's run folder; without one, the
    checkpoint folder `start_from` (a search trial's latest, when the refit trains its fold)."""
    import ray.train  # heavy: Ray loads only in the functions that run under it

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        copy_checkpoint_files(checkpoint, out)
    elif start_from:
        if continue_from(start_from, out, cfg):
            log(f"refit: continuing the search trial's run from {start_from}")
        else:
            log(f"refit: {start_from} is not a run of this configuration; training from scratch")


def continue_from(start_from: str, out: Path, cfg: Config) -> bool:
    """Copy the run files of the checkpoint folder `start_from` into `out` when they are a run of
    `cfg` (`train.can_resume`); otherwise leave `out` as it was. Returns whether they were copied."""
    import ray.train  # heavy: Ray loads only in the functions that run under it

    fs, path = filesystem(start_from)
    copied = copy_checkpoint_files(ray.train.Checkpoint(path, filesystem=fs), out)
    if LAST in copied and can_resume(load_checkpoint(out / LAST)["config"], cfg):
        return True
    for name in copied:  # another configuration's run, or no last.pt: fit starts from scratch
        (out / name).unlink()
    return False


def copy_checkpoint_files(checkpoint, out: Path) -> list[str]:
    """Copy the RESTORED_FILES a checkpoint holds into `out`, straight from its filesystem.

    Not through `Checkpoint.as_directory`: for any filesystem but pyarrow's local one, that
    downloads into one temporary folder shared by every process of the node, and a worker that
    enters it as another leaves finds it deleted or half-deleted (reproduced: 15 of 200 staggered
    restores saw files missing, 12 more raised). A rank missing last.pt would start from scratch
    while the others resume; here each worker reads the files itself.
    """
    fs = checkpoint.filesystem
    copied = []
    for info in fs.get_file_info([f"{checkpoint.path}/{name}" for name in RESTORED_FILES]):
        if info.type == pyarrow.fs.FileType.File:
            with fs.open_input_stream(info.path) as source, open(out / info.base_name, "wb") as target:
                shutil.copyfileobj(source, target, 1 << 20)
            copied.append(info.base_name)
    return copied


LATENCY_METRIC = "latency_ms"  # reported with every epoch of a multi-objective search's trials


def _report_to_ray(metrics: dict, checkpoint_dir: str | None, extra: dict | None = None) -> None:
    import ray.train  # heavy: Ray loads only in the functions that run under it

    metrics = {**metrics, **(extra or {}), "epochs_done": metrics["epoch"] + 1}
    checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
    ray.train.report(metrics, checkpoint=checkpoint)


def train_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker: fit() one fold; with `oof`, then out-of-fold probabilities."""
    import ray.train  # heavy: Ray loads only in the functions that run under it
    import ray.train.torch

    cfg = from_dict(Config, loop_config["config"])
    rank = ray.train.get_context().get_world_rank()
    # Node-local run folder, removed at the end: ray.train.report has uploaded the checkpoints by then.
    with scratch_folder(f"rank{rank}") as out:
        cfg.out = str(out)
        log = print if rank == 0 else (lambda *_: None)
        _restore_latest(out, cfg, loop_config.get("start_from"), log)
        device = ray.train.torch.get_device()
        extra = {}
        if loop_config.get("latency_tta") and rank == 0:  # only rank 0's metrics reach Tune
            extra[LATENCY_METRIC] = trial_latency(cfg, loop_config["latency_tta"], device)
            log(f"search: inference {extra[LATENCY_METRIC]:.2f} ms per slice on {device_name(device)}")
        best = fit(cfg, report=functools.partial(_report_to_ray, extra=extra), device=device, log=log)
        if loop_config.get("oof_tta"):
            report_oof(cfg, out, best, loop_config["oof_tta"], device)


def trial_latency(cfg: Config, tta: str, device) -> float:
    """Inference ms per slice of the trial's network (its weights do not matter: freshly built) with
    the fused engine on the trial's device, on the first validation case-day of its fold."""
    cache = Cache(cfg.data.cache)
    case_day = cache.case_days(folds=[cfg.data.fold])[0]
    entry = cache.entries[case_day]
    model = prepare_for_inference(build_model(cfg.model, cfg.data.channels).to(device), cfg.train.channels_last)
    return ms_per_slice(model, cache.image(case_day), cfg.data.channels, cfg.data.stride,
                        (entry["height"], entry["width"]), tta, device)


def report_oof(cfg: Config, out: Path, best: dict, tta: str, device) -> None:
    """Out-of-fold probabilities of the best epoch's model, each rank a share of the fold's volumes.

    Reported as one final checkpoint: Ray merges the workers' folders, so it holds best.pt,
    config.yaml and oof/<case_day>.npy for every validation case-day of the fold.
    """
    import ray.train  # heavy: Ray loads only in the functions that run under it

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cache = Cache(cfg.data.cache)
    # Only rank 0 wrote best.pt; the other ranks get it over the training process group.
    state = [load_checkpoint(out / BEST) if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(state, src=0)
    model = prepare_for_inference(model_from_checkpoint(state[0], device), cfg.train.channels_last)
    with scratch_folder(f"oof{rank}") as final:
        write_oof(model, cache, cache.case_days(folds=[cfg.data.fold])[rank::world], final / OOF_FOLDER,
                  cfg.data.channels, cfg.data.stride, tta, device)
        if rank == 0:
            for name in (BEST, "config.yaml", "metrics.jsonl"):
                shutil.copy2(out / name, final / name)
        metrics = {**best, "stage": "oof"}  # the best epoch's metrics, with its checkpoint and OOF
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(final)))


def launch_train_run(cfg: Config, *, run_name: str, storage_path: str, workers, max_failures: int,
                     oof_tta: str | None = None, start_from: str | None = None, latency_tta: str | None = None) -> None:
    """One Ray Train run of `cfg` (called inside a Tune trial); raises if training fails.

    `start_from`: a checkpoint folder of an earlier run of the same configuration and fold; a run
    without a checkpoint of its own continues from it instead of starting over.
    """
    import ray.train  # heavy: Ray loads only in the functions that run under it
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    fs, fs_path = filesystem(storage_path)
    # Ray Train propagates these from the process calling fit() to its controller. Workers can take
    # minutes to start on a busy node (60 s by default, then the run fails). The controller polls
    # its workers every 2 s by default and notices a start, a report or a finish only then: at 0.2 s,
    # four trivial Train runs took 77 s instead of 111 s (BENCHMARKS.md; a poll is one small actor
    # call per worker).
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    resources = {"CPU": workers.cpus_per_worker}
    if workers.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": to_dict(cfg), "oof_tta": oof_tta, "start_from": start_from,
                           "latency_tta": latency_tta},
        scaling_config=ray.train.ScalingConfig(num_workers=workers.num_workers, use_gpu=workers.use_gpu,
                                               resources_per_worker=resources, placement_strategy=workers.placement),
        run_config=ray.train.RunConfig(
            # The same (storage_path, name) on a restart makes Ray Train resume from the latest checkpoint.
            name=run_name,
            storage_path=fs_path,
            storage_filesystem=fs,  # a local folder's files are replaced whole (search/storage.py)
            callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),  # each holds last.pt and best.pt
        ),
    )
    trainer.fit()


def search_trial(config: dict, *, params, base: dict, storage_path: str, workers, max_failures: int,
                 latency_tta: str | None = None) -> None:
    """The Tune trial function of the search: decode the suggestion, launch its Train run (which
    measures the network's latency with TTA `latency_tta` in a multi-objective search)."""
    import ray.tune  # heavy: Ray loads only in the functions that run under it

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(base, decode(params, config))
    launch_train_run(cfg, run_name=f"trial-{trial_id}", storage_path=storage_path, workers=workers,
                     max_failures=max_failures, latency_tta=latency_tta)


def refit_trial(config: dict, *, base: dict, storage_path: str, workers, max_failures: int, tta: str) -> None:
    """The Tune trial function of the refit: one (configuration, fold) with out-of-fold probabilities."""
    job = config["job"]
    cfg = trial_config(base, {**job["values"], "data.fold": job["fold"]})
    launch_train_run(cfg, run_name=f"refit-{job['rank']}-fold{job['fold']}", storage_path=storage_path,
                     workers=workers, max_failures=max_failures, oof_tta=tta, start_from=job.get("start_from"))
