"""The checkpoint contract: one flat dict that rebuilds its model with nothing else.

Written by the training loop (rank 0, atomically), read by inference, the refit's out-of-fold
pass, the ensemble and the search. Fields: format, model (weights, no DDP/compile wrapper),
config (resolved), fold, epoch, metrics, history, best_score, best_epoch, preprocessing (size,
channels, stride, normalisation, classes); `last.pt` also holds the optimizer state. Loaded with
`weights_only=True`: only tensors and plain Python values, never pickled code.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from gitseg.config import Config, from_dict
from gitseg.files import atomic_path
from gitseg.models import build_model

CHECKPOINT_FORMAT = 1
LAST, BEST = "last.pt", "best.pt"  # the latest epoch (with optimizer, to resume) and the best one


def default_device() -> torch.device:
    """The GPU of this process's local rank when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a gitseg checkpoint of format {CHECKPOINT_FORMAT}")
    return state


def model_from_checkpoint(state: dict, device="cpu") -> torch.nn.Module:
    """Rebuild the model from a checkpoint alone (config + weights), in eval mode on `device`."""
    cfg = from_dict(Config, state["config"])
    model = build_model(cfg.model, state["preprocessing"]["channels"])
    model.load_state_dict(state["model"])
    return model.to(device).eval()
