"""The Ray cluster a search runs on and what each trial reserves on it."""

from __future__ import annotations

import functools
import os

from gitseg.progress import note
from search.settings import SearchConfig

# The trial driver only waits for its Train run; Ray needs it to reserve something, so a sliver.
TRIAL_DRIVER_CPU = 0.01
# ... and a sliver of the head node's own resource, so that it runs on the head: Ray Train puts the
# run's controller on its driver's node, and a trial whose driver or controller was on a lost worker
# node failed, where a lost worker only restarts the worker group (tests/test_multinode.py).
HEAD_NODE = "node:__internal_head__"  # ray._common.constants.HEAD_NODE_RESOURCE_NAME
TRIAL_DRIVER_HEAD = 0.001


def init_ray(settings: SearchConfig) -> bool:
    """Join the cluster named by RAY_ADDRESS (ray job submit, ray submit), or start a local instance.
    Returns whether this call connected (False: Ray was initialised already)."""
    import ray  # heavy: starts nothing, but loads Ray's whole client

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(num_cpus=settings.num_cpus, log_to_driver=True)
    note(f"search: Ray resources {ray.cluster_resources()}")
    return True


def trial_resources(settings: SearchConfig) -> dict:
    """What one trial reserves: its driver and its DDP workers."""
    w = settings.workers
    need = {"CPU": TRIAL_DRIVER_CPU + w.num_workers * w.cpus_per_worker}
    if w.use_gpu:
        need["GPU"] = float(w.num_workers)
    return need


def concurrent_trials(settings: SearchConfig) -> int:
    """max_concurrent_trials from the config, or what the cluster's CPUs/GPUs can hold at once."""
    if settings.max_concurrent_trials:
        return settings.max_concurrent_trials
    import ray  # heavy

    have = ray.cluster_resources()
    fits = [have.get(k, 0.0) / v for k, v in trial_resources(settings).items() if v > 0]
    return max(1, int(min(fits)))


def trainable(fn, **kwargs):
    """A Tune trainable of `fn(config, **kwargs)` whose driver reserves TRIAL_DRIVER_CPU on the head node."""
    import ray.tune  # heavy

    return ray.tune.with_resources(functools.partial(fn, **kwargs),
                                   {"CPU": TRIAL_DRIVER_CPU, HEAD_NODE: TRIAL_DRIVER_HEAD})
