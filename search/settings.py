"""The search configuration (YAML): what to search, where it runs, where results go."""

from __future__ import annotations

import dataclasses

from gitseg.config import ConfigError, apply_overrides, from_dict, read_yaml

PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray's placement group strategies


@dataclasses.dataclass
class WorkersConfig:
    num_workers: int = 2          # DDP workers per trial (Ray Train)
    use_gpu: bool = False         # one GPU per worker when true
    cpus_per_worker: float = 1.0  # logical CPUs each worker reserves
    placement: str = "PACK"       # Ray's placement of a trial's workers: PACK (fewest nodes, fastest
                                  # all-reduce) or SPREAD (different nodes where they fit: one node's loss
                                  # takes fewer workers); STRICT_ forms refuse to start otherwise


@dataclasses.dataclass
class AshaConfig:
    enabled: bool = True          # false: every trial runs all its epochs (the benchmark baseline)
    grace_period: int = 2         # epochs before a trial can be stopped (1 ranks configurations almost
                                  # at random on the benchmark: BENCHMARKS.md, runs 8-11)
    reduction_factor: int = 4     # keep the best 1/reduction_factor at each rung (ASHA paper's and Ray's default)
    brackets: int = 1             # >1: Ray's multi-bracket ASHA; bracket b's first rung is at grace_period x
                                  # reduction_factor^b, and at the most brackets the last one never stops a
                                  # trial early (late bloomers keep a chance; Ray draws each trial's bracket,
                                  # weighting brackets with more rungs: e^rungs)


@dataclasses.dataclass
class BudgetConfig:
    trial_epochs: int | None = None  # epochs over all trials after which no new trial starts and running
                                     # trials stop at their next rung (None: no budget; search/budget.py)
    wall_s: float | None = None      # the same after this many seconds of the search's driver


@dataclasses.dataclass
class RefitConfig:
    topk: int = 2                 # configurations trained on every fold after the search
    select: str = "topk"          # topk: the best scores; pareto: the trials on the score-latency front
                                  # (multi-objective searches), best score first, at most topk of them
    folds: list[int] | None = None  # None: all folds of the cache
    tta: str = "hflip"            # TTA of the out-of-fold probabilities


@dataclasses.dataclass
class TrackingConfig:
    # MLflow: the search as a parent run, one child run per trial and per refit run (parameters, every
    # epoch's metrics, the checkpoint), the ensemble's and the report's figures (search/tracking.py)
    mlflow: bool = False
    mlflow_uri: str | None = None   # None: sqlite:///<search folder>/mlflow.db; or a server's http://host:5000
    experiment: str | None = None   # the MLflow experiment (None: the search's name)
    # Optuna's study (the sampler's trials, what optuna-dashboard shows): "sqlite" keeps it in
    # <search folder>/optuna.db (an in-memory study for a search on an object store), "memory" in the
    # driver only, or any Optuna RDB URL (postgresql://... on a cluster)
    optuna_storage: str = "sqlite"


@dataclasses.dataclass
class SearchConfig:
    name: str = "search"                      # experiment name: the folder under storage_path
    base: str = "configs/demo.yaml"           # experiment config every trial starts from
    set: list[str] = dataclasses.field(default_factory=list)  # overrides of the base (key=value)
    storage_path: str = "runs/search"         # local folder, shared filesystem or object store URI
    metric: str = "score"                     # maximised; the validation competition score
    # [score] or [score, latency]: the second makes the search multi-objective (Optuna's multi-objective
    # TPE): each trial also measures its network's inference ms per slice; early stopping uses the score.
    objectives: list[str] = dataclasses.field(default_factory=lambda: ["score"])
    num_samples: int = 8                      # trials, including the default configuration
    max_concurrent_trials: int | None = None  # None: as many as the cluster's CPUs/GPUs allow
    seed: int = 0
    fold: int = 0                             # the validation fold of the search
    num_cpus: int | None = None               # logical CPUs of a local Ray instance (None: Ray's default)
    max_failures: int = 1                     # restarts of a trial's workers after a worker failure
    workers: WorkersConfig = dataclasses.field(default_factory=WorkersConfig)
    asha: AshaConfig = dataclasses.field(default_factory=AshaConfig)
    budget: BudgetConfig = dataclasses.field(default_factory=BudgetConfig)
    refit: RefitConfig = dataclasses.field(default_factory=RefitConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    points: list[dict] = dataclasses.field(default_factory=list)  # extra configurations evaluated first
    space: dict = dataclasses.field(default_factory=dict)


def load_search_config(path, overrides: list[str] | None = None) -> SearchConfig:
    data = read_yaml(path, example="configs/search_demo.yaml")
    cfg = from_dict(SearchConfig, apply_overrides(data, overrides or []))
    if cfg.num_samples < 1:
        raise ConfigError(f"num_samples must be at least 1 (got {cfg.num_samples})")
    if cfg.workers.num_workers < 1:
        raise ConfigError(f"workers.num_workers must be at least 1 (got {cfg.workers.num_workers})")
    if cfg.workers.placement not in PLACEMENTS:
        raise ConfigError(f"workers.placement must be one of {', '.join(PLACEMENTS)} (got {cfg.workers.placement!r})")
    if cfg.refit.topk < 0:
        raise ConfigError(f"refit.topk must be 0 or more (got {cfg.refit.topk})")
    if cfg.metric != "score" and not cfg.metric.startswith("score/"):
        raise ConfigError(f"metric must be score or score/<class> (got {cfg.metric!r})")
    if cfg.objectives not in (["score"], ["score", "latency"]):
        raise ConfigError(f"objectives must be [score] or [score, latency] (got {cfg.objectives})")
    if cfg.budget.trial_epochs is not None and cfg.budget.trial_epochs < 1:
        raise ConfigError(f"budget.trial_epochs must be at least 1, or null for none (got {cfg.budget.trial_epochs})")
    if cfg.budget.wall_s is not None and cfg.budget.wall_s <= 0:
        raise ConfigError(f"budget.wall_s must be positive, or null for none (got {cfg.budget.wall_s})")
    if cfg.refit.select not in ("topk", "pareto"):
        raise ConfigError(f"refit.select must be topk or pareto (got {cfg.refit.select!r})")
    if cfg.refit.select == "pareto" and "latency" not in cfg.objectives:
        raise ConfigError("refit.select: pareto needs objectives: [score, latency] (a front of score and latency)")
    if cfg.tracking.optuna_storage not in ("sqlite", "memory") and "://" not in cfg.tracking.optuna_storage:
        raise ConfigError(f"tracking.optuna_storage must be sqlite, memory or a database URL such as "
                          f"postgresql://user@host/db (got {cfg.tracking.optuna_storage!r})")
    return cfg
