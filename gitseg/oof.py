"""Out-of-fold probabilities: the one module that writes and reads them.

A fold model's OOF folder holds `<case_day>.npy` for each validation case-day of its fold:
float16 `(3, D, H, W)` in [0, 1], class order CLASSES, at the original image size (the
probability contract, docs/ARCHITECTURE.md). Holdout case-days never have one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gitseg.data.cache import Cache
from gitseg.infer import predict_volume

OOF_FOLDER = "oof"  # inside a refit run's final checkpoint


def oof_file(folder, case_day: str) -> Path:
    return Path(folder) / f"{case_day}.npy"


def load_oof(folder, case_day: str) -> np.ndarray:
    """float32 `(3, D, H, W)` of one case-day; FileNotFoundError names the missing file."""
    path = oof_file(folder, case_day)
    if not path.is_file():
        raise FileNotFoundError(f"no out-of-fold probabilities {path}; re-run the refit")
    return np.load(path).astype(np.float32)


def write_oof(model, cache: Cache, case_days: list[str], folder, channels: int, stride: int, tta: str,
              device=None) -> list[Path]:
    """Predict `case_days` of `cache` with `model` at their original size into `folder`; returns the files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for case_day in case_days:
        entry = cache.entries[case_day]
        probs = predict_volume(model, cache.image(case_day), channels, stride,
                               out_size=(entry["height"], entry["width"]), tta=tta, device=device)
        files.append(oof_file(folder, case_day))
        np.save(files[-1], probs)
    return files
