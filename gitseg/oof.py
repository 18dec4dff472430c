"""Out-of-fold probabilities: the one module that writes and reads them.

A fold model's OOF folder holds `<case_day>.npy` for each validation case-day of its fold:
float16 `(3, D, H, W)` in [0, 1], class order CLASSES, at the original image size (the
probability contract, docs/ARCHITECTURE.md), made with the refit's TTA. When that TTA is not
"none", `none/<case_day>.npy` holds the same forward pass's untransformed view: the same models
without TTA, so that the ensemble can tune and price a TTA-free variant without predicting again.
Models with a gate head (`model.gate`) also leave `gate/<case_day>.npy` beside each: float16
`(3, D)`, the per-slice probability that each class is present. Holdout case-days never have one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gitseg.data.cache import Cache
from gitseg.files import load_array, save_array
from gitseg.infer import predict_volume_sets

OOF_FOLDER = "oof"  # inside a refit run's final checkpoint
NO_TTA = "none"
GATE = "gate"


def oof_tta_sets(tta: str) -> tuple[str, ...]:
    """The TTA sets a refit with TTA `tta` writes out-of-fold probabilities for: `tta`, and "none"."""
    return (tta,) if tta == NO_TTA else (tta, NO_TTA)


def oof_file(folder, case_day: str, tta: str | None = None) -> Path:
    """The file of `case_day`; `tta` None is the refit's own TTA, "none" the untransformed view
    (the same file when the refit used no TTA: pass the refit's TTA to `load_oof`)."""
    folder = Path(folder)
    return (folder / NO_TTA if tta == NO_TTA else folder) / f"{case_day}.npy"


def gate_file(folder, case_day: str, tta: str | None = None) -> Path:
    path = oof_file(folder, case_day, tta)
    return path.parent / GATE / path.name


def load_gate(folder, case_day: str, tta: str | None = None, refit_tta: str | None = None) -> np.ndarray | None:
    """float32 `(3, D)` gate probabilities of one case-day, or None when the model has no gate head."""
    path = gate_file(folder, case_day, None if tta == refit_tta else tta)
    return _load(path).astype(np.float32) if path.is_file() else None


def load_oof(folder, case_day: str, tta: str | None = None, refit_tta: str | None = None) -> np.ndarray:
    """float32 `(3, D, H, W)` of one case-day; FileNotFoundError names the missing file.

    `tta` None or equal to `refit_tta` reads the refit's own probabilities; "none" the TTA-free ones.
    """
    if tta is not None and refit_tta is not None and tta not in oof_tta_sets(refit_tta):
        raise ValueError(f"the refit wrote out-of-fold probabilities with TTA {refit_tta!r} and without TTA, "
                         f"not with {tta!r}; choose one of {', '.join(oof_tta_sets(refit_tta))}")
    path = oof_file(folder, case_day, None if tta == refit_tta else tta)
    if not path.is_file():
        raise FileNotFoundError(f"no out-of-fold probabilities {path}; re-run the refit")
    return _load(path).astype(np.float32)


def _load(path: Path) -> np.ndarray:
    return load_array(path, "re-run the refit of that fold (its run resumes and writes the out-of-fold files again)")


def write_oof(model, cache: Cache, case_days: list[str], folder, channels: int, stride: int, tta: str,
              device=None) -> list[Path]:
    """Predict `case_days` of `cache` with `model` at their original size into `folder`, with TTA `tta`
    and (when that is not "none") without; returns the files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if tta != NO_TTA:
        (folder / NO_TTA).mkdir(exist_ok=True)
    files = []
    for case_day in case_days:
        entry = cache.entries[case_day]
        probs, gates = predict_volume_sets(model, cache.image(case_day), channels, stride, oof_tta_sets(tta),
                                           out_size=(entry["height"], entry["width"]), device=device)
        for name, p in probs.items():
            files.append(oof_file(folder, case_day, None if name == tta else name))
            save_array(files[-1], p)
            if name in gates:
                files.append(gate_file(folder, case_day, None if name == tta else name))
                files[-1].parent.mkdir(exist_ok=True)
                save_array(files[-1], gates[name])
    return files
