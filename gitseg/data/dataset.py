"""Reading the volume cache: 2.5D training samples and whole validation volumes.

A 2.5D sample stacks `channels` slices around slice z, `stride` apart, as input channels
(stride 2 is common: neighbouring 3 mm slices are nearly identical). At the volume ends the
window is clamped, so every slice of a volume yields exactly one sample.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from gitseg.data.cache import Cache, window_indices  # noqa: F401 - window_indices: also imported from here


class SliceDataset(Dataset):
    """2.5D training samples: image float32 `(C, S, S)`, masks float32 `(3, S, S)`.

    `augment` is an albumentations transform applied identically to every channel and mask;
    `artefacts` (gitseg.data.artefacts.Artefacts) MRI artefacts applied to the image before it.
    With a `teacher` (gitseg.teacher.Teacher), the targets are `(6, S, S)`: the labels, then the
    teacher's probabilities, augmented together; the teacher's pseudo-labelled case-days are added
    as samples, their pseudo-labels standing for the labels.
    """

    def __init__(self, cache: Cache, case_days: list[str], channels: int = 3, stride: int = 1, augment=None,
                 teacher=None, artefacts=None):
        if not case_days:
            raise ValueError("SliceDataset needs at least one case-day")
        self.cache, self.augment, self.teacher, self.artefacts = cache, augment, teacher, artefacts
        self.stride = stride
        self.pseudo = set()
        slices = {cd: cache.entries[cd]["slices"] for cd in case_days}
        if teacher is not None:
            teacher.check_covers(case_days, cache.size)
            self.pseudo = set(teacher.pseudo)
            slices.update({cd: teacher.entries[cd]["slices"] for cd in teacher.pseudo})
        self.windows = {cd: window_indices(d, channels, stride) for cd, d in slices.items()}
        self.items = [(cd, z) for cd, d in slices.items() for z in range(d)]

    def __len__(self) -> int:
        return len(self.items)

    def _pixel_mm(self, case_day: str) -> tuple[float, float, float]:
        """(slice, row, column) mm between the window's slices and the resized pixels."""
        entry = self.cache.entries.get(case_day) or self.teacher.entries[case_day]
        size = self.cache.size
        if "spacing" not in entry:  # a pseudo-labelled case-day: no recorded spacing
            return (3.0 * self.stride, 1.5, 1.5)
        thickness, row_mm, col_mm = entry["spacing"]
        return (thickness * self.stride, row_mm * entry["height"] / size, col_mm * entry["width"] / size)

    def __getitem__(self, index: int):
        case_day, z = self.items[index]
        source = self.teacher if case_day in self.pseudo else self.cache
        image = np.asarray(source.image(case_day)[self.windows[case_day][z]], dtype=np.float32)  # (C, S, S)
        masks = source.masks(case_day, z)  # (3, S, S)
        if self.artefacts is not None:  # acquisition artefacts: the image only, at its pixel size
            image = self.artefacts(image, self._pixel_mm(case_day))
        if self.teacher is not None:  # uint8 0/1 labels and 0..255 probabilities, transformed as one
            masks = np.concatenate([masks.astype(np.uint8), self.teacher.probs(case_day, z)])
        if self.augment is not None:
            out = self.augment(image=image.transpose(1, 2, 0), mask=masks.transpose(1, 2, 0).astype(np.uint8))
            image = np.ascontiguousarray(out["image"].transpose(2, 0, 1))
            masks = out["mask"].transpose(2, 0, 1)
        targets = np.ascontiguousarray(masks, dtype=np.float32)
        if self.teacher is not None:
            targets[3:] /= 255.0
        return torch.from_numpy(image), torch.from_numpy(targets)


class VolumeDataset(Dataset):
    """Whole volumes in slice order for validation: one item per case-day.

    Yields `case_day`, image float32 `(D, C, S, S)` and masks bool `(3, D, S, S)`.
    """

    def __init__(self, cache: Cache, case_days: list[str], channels: int = 3, stride: int = 1):
        self.cache, self.case_days = cache, list(case_days)
        self.channels, self.stride = channels, stride
        window_indices(1, channels, stride)  # validate up front

    def __len__(self) -> int:
        return len(self.case_days)

    def __getitem__(self, index: int):
        case_day = self.case_days[index]
        volume = np.asarray(self.cache.image(case_day), dtype=np.float32)
        windows = window_indices(len(volume), self.channels, self.stride)
        return case_day, volume[windows], self.cache.masks(case_day)


def build_augment(strength: float):
    """Albumentations pipeline for training; strength 0 means none, 1 the default amounts.

    No vertical flips: abdominal anatomy has a fixed up-down orientation.
    """
    if strength < 0:
        raise ValueError(f"augmentation strength must be >= 0 (got {strength})")
    if strength == 0:
        return None
    import albumentations as A  # heavy (it loads pydantic and OpenCV): only training augments
    import cv2

    s = float(strength)
    return A.Compose([
        A.HorizontalFlip(p=0.5),
        A.Affine(scale=(1 - 0.1 * s, 1 + 0.1 * s), translate_percent=(-0.0625 * s, 0.0625 * s),
                 rotate=(-15 * s, 15 * s), border_mode=cv2.BORDER_CONSTANT, p=min(1.0, 0.5 * s)),
        A.RandomBrightnessContrast(brightness_limit=0.15 * s, contrast_limit=0.15 * s, p=min(1.0, 0.5 * s)),
    ])
