"""The experiment config's checks that its types cannot make: registry names, the 2.5D window,
the cache's folds and the ranges of the training settings. `train`, `search` and `distill` call
`check_config` before any work, so a bad setting fails in a second, not in trial 37.
"""

from __future__ import annotations

from pathlib import Path

from gitseg.config import SCHEDULES, Config, ConfigError
from gitseg.data.artefacts import Artefacts
from gitseg.data.cache import Cache
from gitseg.data.dataset import window_indices
from gitseg.losses import check_loss_terms
from gitseg.models import check_model_names


def check_config(cfg: Config, cache: Cache) -> None:
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
    try:
        Artefacts(cfg.data.artefacts, cfg.data.artefact_prob)
    except ValueError as exc:
        raise ConfigError(f"data.artefacts/data.artefact_prob: {exc}") from None
    if not 0 <= cfg.train.teacher_weight <= 1:
        raise ConfigError(f"train.teacher_weight must be in [0, 1] (got {cfg.train.teacher_weight})")
    if cfg.data.teacher and not Path(cfg.data.teacher).is_dir():
        raise ConfigError(f"data.teacher: {cfg.data.teacher} is not a folder; `gitseg distill` writes one")
    if not 0 < cfg.train.threshold < 1:
        raise ConfigError(f"train.threshold must be in (0, 1) (got {cfg.train.threshold})")
    if cfg.train.schedule not in SCHEDULES:
        raise ConfigError(f"train.schedule must be one of {', '.join(SCHEDULES)} (got {cfg.train.schedule!r})")
    if not 0 < cfg.train.decay_fraction <= 1:
        raise ConfigError(f"train.decay_fraction must be in (0, 1] (got {cfg.train.decay_fraction})")
    if not 0 <= cfg.train.ema < 1:
        raise ConfigError(f"train.ema must be in [0, 1): a decay such as 0.999, or 0 for off (got {cfg.train.ema})")
