"""Teacher targets for distillation: the one module that writes and reads them.

`gitseg distill` writes a teacher folder from an ensemble; a student trained with `data.teacher`
pointing at it learns from the labels and from these probabilities (gitseg.train). Layout:

    teacher.json                  size, source, and per case-day its slices and whether it is pseudo-labelled
    <case_day>.probs.npy          uint8 (3, D, S, S): the teacher's probability x 255 at the cache size S
    <case_day>.image.npy          float16 (D, S, S): the network input (pseudo-labelled case-days only;
                                  labelled ones are read from the cache)
    <case_day>.masks.npy          uint8 (3, D, S, ceil(S/8)): packed pseudo-labels, the teacher's
                                  post-processed masks (pseudo-labelled case-days only)

For a labelled case-day the probabilities are the ensemble's out-of-fold predictions: only models
that did not train on it. uint8 keeps a step of 1/255, finer than any soft target needs, at a
quarter of float32's size (at the real data's size, about 12 GB for every labelled case-day).
teacher.json is written last: a folder without it is incomplete and is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gitseg.files import load_array, save_array, write_text_atomic
from gitseg.oof import quantise

TEACHER_RECORD = "teacher.json"
TEACHER_FORMAT = 1
ADVICE = "run `gitseg distill` again: it rewrites the teacher folder"


def write_case_day(folder, case_day: str, probs: np.ndarray, image: np.ndarray | None = None,
                   packed_masks: np.ndarray | None = None) -> None:
    """One case-day's teacher probabilities float `(3, D, S, S)` at the cache size; a pseudo-labelled
    one also gets its network input float16 `(D, S, S)` and packed pseudo-label masks."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_array(folder / f"{case_day}.probs.npy", quantise(probs))
    if image is not None:
        save_array(folder / f"{case_day}.image.npy", np.asarray(image, dtype=np.float16))
        save_array(folder / f"{case_day}.masks.npy", packed_masks)


def write_record(folder, size: int, source: dict, case_days: dict[str, dict]) -> None:
    """teacher.json, last: `case_days` maps each case-day to {slices, pseudo}."""
    record = {"format": TEACHER_FORMAT, "size": int(size), "source": source, "case_days": case_days}
    write_text_atomic(Path(folder) / TEACHER_RECORD, json.dumps(record, indent=1))


class Teacher:
    """A teacher folder as training reads it (memory-mapped, opened lazily per process)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        path = self.folder / TEACHER_RECORD
        if not path.is_file():
            raise FileNotFoundError(f"no {TEACHER_RECORD} in {self.folder}: not a complete teacher folder; {ADVICE}")
        record = json.loads(path.read_text())
        if record.get("format") != TEACHER_FORMAT:
            raise ValueError(f"{path} is not a teacher record of format {TEACHER_FORMAT}; {ADVICE}")
        self.size = int(record["size"])
        self.source = record["source"]
        self.entries: dict[str, dict] = record["case_days"]
        self._open: dict[str, np.ndarray] = {}

    def __getstate__(self):  # memmaps do not survive pickling into DataLoader workers
        return {**self.__dict__, "_open": {}}

    @property
    def pseudo(self) -> list[str]:
        """The unlabelled case-days the teacher labelled."""
        return [cd for cd, e in self.entries.items() if e["pseudo"]]

    def _array(self, case_day: str, kind: str) -> np.ndarray:
        key = f"{case_day}.{kind}"
        if key not in self._open:
            self._open[key] = load_array(self.folder / f"{key}.npy", ADVICE, mmap=True)
        return self._open[key]

    def probs(self, case_day: str, z: int) -> np.ndarray:
        """uint8 `(3, S, S)` of slice z (probability x 255)."""
        return np.asarray(self._array(case_day, "probs")[:, z])

    def image(self, case_day: str) -> np.ndarray:
        """float16 `(D, S, S)` of a pseudo-labelled case-day."""
        return self._array(case_day, "image")

    def masks(self, case_day: str, z: int) -> np.ndarray:
        """bool `(3, S, S)` pseudo-labels of slice z."""
        return np.unpackbits(self._array(case_day, "masks")[:, z], axis=-1, count=self.size).astype(bool)

    def check_covers(self, case_days: list[str], size: int) -> None:
        """Refuse a teacher made for another cache size or missing a training case-day."""
        if size != self.size:
            raise ValueError(f"data.teacher {self.folder} holds targets at {self.size} px but the cache is at "
                             f"{size} px; {ADVICE} for this cache")
        missing = [cd for cd in case_days if cd not in self.entries]
        if missing:
            raise ValueError(f"data.teacher {self.folder} has no targets for {len(missing)} training case-day(s) "
                             f"(e.g. {missing[0]}); {ADVICE} for this cache")
