"""Losses by name and weighted mixes given as data: `[{name: bce, weight: 0.5}, {name: dice, weight: 0.5}]`."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from gitseg.config import ConfigError, LossTerm


def _smp_losses():
    with warnings.catch_warnings():  # smp is heavy (it loads timm) and warns at import
        warnings.simplefilter("ignore")
        from segmentation_models_pytorch import losses
    return losses


# Each builds a loss over mask logits (N, 3, H, W) and float targets of the same shape, multi-label.
LOSSES = {
    "bce": lambda: nn.BCEWithLogitsLoss(),
    "dice": lambda: _smp_losses().DiceLoss(mode="multilabel", from_logits=True),
    "jaccard": lambda: _smp_losses().JaccardLoss(mode="multilabel", from_logits=True),
    "tversky": lambda: _smp_losses().TverskyLoss(mode="multilabel", from_logits=True, alpha=0.5, beta=0.5),
    "focal": lambda: _smp_losses().FocalLoss(mode="multilabel"),
    "lovasz": lambda: _smp_losses().LovaszLoss(mode="multilabel", per_image=False, from_logits=True),
}


class LossMix(nn.Module):
    """Weighted sum of named losses; `forward` returns (total, {name: value})."""

    def __init__(self, terms: list[LossTerm]):
        super().__init__()
        check_loss_terms(terms)
        self.names = [t.name for t in terms]
        self.weights = [float(t.weight) for t in terms]
        self.losses = nn.ModuleList([LOSSES[t.name]() for t in terms])

    def forward(self, logits: torch.Tensor, targets: torch.Tensor):
        parts = {}
        total = logits.new_zeros(())
        for name, weight, loss in zip(self.names, self.weights, self.losses):
            value = loss(logits.float(), targets)
            parts[name] = value.detach()
            total = total + weight * value
        return total, parts


def check_loss_terms(terms: list[LossTerm]) -> None:
    if not terms:
        raise ConfigError("train.loss: give at least one term, e.g. [{name: bce, weight: 1.0}]")
    for i, term in enumerate(terms):
        if term.name not in LOSSES:
            raise ConfigError(f"train.loss[{i}].name: unknown loss {term.name!r}; choose one of {', '.join(LOSSES)}")
        if term.weight < 0:
            raise ConfigError(f"train.loss[{i}].weight must be >= 0 (got {term.weight})")
    if sum(t.weight for t in terms) <= 0:
        raise ConfigError("train.loss: the weights sum to 0")
