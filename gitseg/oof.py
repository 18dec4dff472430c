"""Out-of-fold probabilities: the one module that writes and reads them.

A fold model's OOF folder holds `<case_day>.npz` for each validation case-day of its fold: the
probabilities `(3, D, H, W)` at the original image size, class order CLASSES (the probability
contract, docs/ARCHITECTURE.md), made with the refit's TTA, and for models with a gate head
(`model.gate`) the per-slice probability that each class is present `(3, D)`. When that TTA is not
"none", `none/<case_day>.npz` holds the same forward pass's untransformed view: the same models
without TTA, so that the ensemble can tune and price a TTA-free variant without predicting again.
Holdout case-days never have one.

Storage: probabilities are quantised to uint8 steps of 1/255 (`quantise`) and deflated. At the
real data's size float16 would take about 17 GB per configuration and TTA view; this takes about
1/30 of that for a trained model, whose probabilities are mostly exactly zero after rounding
(BENCHMARKS.md, real size). Rounding is `floor(255 p + 1/2)`, monotonic, so for one model the
mask at threshold t of the stored probabilities is exactly the mask of the exact probabilities at
`stored_threshold(t)`, within half a step of t: tuning and scores move by no more than moving
every threshold by half a step (tests/test_oof_storage.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from gitseg.data.cache import Cache
from gitseg.files import corrupt, load_compressed, save_compressed
from gitseg.infer import predict_volume_sets

OOF_FOLDER = "oof"  # inside a refit run's final checkpoint
NO_TTA = "none"
SUFFIX = ".npz"
ADVICE = "re-run the refit of that fold (its run resumes and writes the out-of-fold files again)"


def quantise(probs: np.ndarray) -> np.ndarray:
    """float probabilities in [0, 1] → uint8 steps of 1/255, rounding halves up (`floor(255 p + 1/2)`)."""
    return np.clip(np.floor(np.asarray(probs, dtype=np.float32) * 255.0 + 0.5), 0, 255).astype(np.uint8)


def dequantise(steps: np.ndarray) -> np.ndarray:
    """uint8 steps → float32 probabilities."""
    return np.asarray(steps, dtype=np.float32) * np.float32(1.0 / 255.0)


def stored_threshold(threshold: float) -> float:
    """The threshold on exact probabilities whose mask equals threshold `threshold` on stored ones:
    `dequantise(quantise(p)) >= t`  ⇔  `p >= stored_threshold(t)`."""
    return (math.ceil(threshold * 255.0 - 1e-9) - 0.5) / 255.0


def oof_tta_sets(tta: str) -> tuple[str, ...]:
    """The TTA sets a refit with TTA `tta` writes out-of-fold probabilities for: `tta`, and "none"."""
    return (tta,) if tta == NO_TTA else (tta, NO_TTA)


def oof_file(folder, case_day: str, tta: str | None = None) -> Path:
    """The file of `case_day`; `tta` None is the refit's own TTA, "none" the untransformed view
    (the same file when the refit used no TTA: pass the refit's TTA to `load_oof`)."""
    folder = Path(folder)
    return (folder / NO_TTA if tta == NO_TTA else folder) / f"{case_day}{SUFFIX}"


def _read(folder, case_day: str, tta: str | None, refit_tta: str | None, name: str) -> np.ndarray | None:
    if tta is not None and refit_tta is not None and tta not in oof_tta_sets(refit_tta):
        raise ValueError(f"the refit wrote out-of-fold probabilities with TTA {refit_tta!r} and without TTA, "
                         f"not with {tta!r}; choose one of {', '.join(oof_tta_sets(refit_tta))}")
    path = oof_file(folder, case_day, None if tta == refit_tta else tta)
    if not path.is_file():
        raise FileNotFoundError(f"no out-of-fold probabilities {path}; re-run the refit")
    array = load_compressed(path, ADVICE, names=(name,)).get(name)
    if name == "probs" and (array is None or array.dtype != np.uint8):
        raise corrupt(path, "no uint8 array 'probs'", ADVICE)
    return array


def load_oof(folder, case_day: str, tta: str | None = None, refit_tta: str | None = None) -> np.ndarray:
    """float32 `(3, D, H, W)` of one case-day; FileNotFoundError names the missing file.

    `tta` None or equal to `refit_tta` reads the refit's own probabilities; "none" the TTA-free ones.
    """
    return dequantise(_read(folder, case_day, tta, refit_tta, "probs"))


def load_gate(folder, case_day: str, tta: str | None = None, refit_tta: str | None = None) -> np.ndarray | None:
    """float32 `(3, D)` gate probabilities of one case-day, or None when the model has no gate head."""
    gate = _read(folder, case_day, tta, refit_tta, "gate")
    return None if gate is None else dequantise(gate)


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
            arrays = {"probs": quantise(p)} | ({"gate": quantise(gates[name])} if name in gates else {})
            save_compressed(files[-1], **arrays)
    return files
