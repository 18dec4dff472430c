"""The checkpoint contract: one flat dict that rebuilds its model with nothing else.

Written by the training loop (rank 0, atomically), read by inference, the refit's out-of-fold
pass, the ensemble and the search. Fields: format, model (weights, no DDP/compile wrapper),
config (resolved), fold, epoch, metrics, history, best_score, best_epoch, preprocessing (size,
channels, stride, normalisation, classes); `last.pt` also holds the optimizer state and, with
`train.ema`, `train_model`: the optimiser's own weights, while `model` is always what was
validated (the moving average when it is on), so every reader predicts with it unchanged. Loaded
with `weights_only=True`: only tensors and plain Python values, never pickled code. Each file also
holds `weights_sha256` (and `train_weights_sha256`), the digest of its weights, checked when it is
loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import pickle
import zipfile
from pathlib import Path

import torch

from gitseg.config import Config, from_dict
from gitseg.files import atomic_path, corrupt, write_failed
from gitseg.models import build_model

CHECKPOINT_FORMAT = 1
LAST, BEST = "last.pt", "best.pt"  # the latest epoch (with optimizer, to resume) and the best one


def default_device() -> torch.device:
    """The GPU of this process's local rank when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def weights_digest(weights: dict) -> str:
    """sha256 over a state dict's names and tensor bytes, in name order: torch checks a checkpoint's
    structure when it loads it, but not the tensor bytes (an altered byte loads silently)."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(path: Path, state: dict) -> None:
    """Write `state` whole (atomically), with the digest of its weights; a failed write (a full disk)
    leaves the previous file intact and says so."""
    state = {**state, "weights_sha256": weights_digest(state["model"])}
    if "train_model" in state:
        state["train_weights_sha256"] = weights_digest(state["train_model"])
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except OSError as exc:
        raise write_failed(path, exc) from exc


def load_checkpoint(path, check_weights: bool = True) -> dict:
    """The checkpoint at `path`, checked: a truncated file (torch's own error) or weights that do not
    match their digest raise CorruptFileError naming the file. `check_weights=False` skips the digest,
    for a file whose bytes were just checked against a sha256 (an ensemble's members)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint {path}")
    advice = "restore it from a copy, or delete it to train that run again"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, zipfile.BadZipFile) as exc:
        raise corrupt(path, f"torch cannot read it: {str(exc).splitlines()[0][:120]}", advice) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a gitseg checkpoint of format {CHECKPOINT_FORMAT}")
    for weights, digest, what in (("model", "weights_sha256", "weights"),
                                  ("train_model", "train_weights_sha256", "training weights")):
        expected = state.pop(digest, None)  # absent in checkpoints written before digests
        if check_weights and expected is not None and weights_digest(state[weights]) != expected:
            raise corrupt(path, f"its {what} do not match their sha256", advice)
    return state


def model_from_checkpoint(state: dict, device="cpu") -> torch.nn.Module:
    """Rebuild the model from a checkpoint alone (config + weights), in eval mode on `device`.

    Every weight comes from the checkpoint: encoder weights named in its config are not read (the
    file may not exist where it predicts), and the network is built on the meta device, so that no
    time goes into a random initialisation the checkpoint overwrites (about 0.1 s per network on 2
    cores; a tensor the checkpoint does not hold makes it build the plain way).
    """
    cfg = from_dict(Config, state["config"])
    model_cfg = dataclasses.replace(cfg.model, encoder_weights=None)
    channels = state["preprocessing"]["channels"]
    with torch.device("meta"):
        model = build_model(model_cfg, channels)
    model.load_state_dict(state["model"], assign=True)
    if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        model = build_model(model_cfg, channels)  # a buffer outside the state dict: build it for real
        model.load_state_dict(state["model"])
    return model.to(device).eval()
