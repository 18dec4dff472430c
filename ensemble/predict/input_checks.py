"""What `gitseg predict` checks before inference, and what it says after.

An ensemble knows the scans it was trained on (`TrainingData` in its manifest, from its cache).
A scan far outside them gets a prediction that looks like any other and means nothing: a 20 mm
field of view, a sagittal series, a single slice. Such a scan is refused with a message that
says what was found and what the ensemble was trained on; `--force` predicts it anyway and the
warnings travel with the outputs. After inference, an organ the scan should hold but the
prediction left empty is said on the terminal.

"Far outside" is wide on purpose: the networks see every scan resized to their input size, so
what matters most is the field of view (the anatomy's scale in the input), then the spacing.
"""

from __future__ import annotations

import numpy as np

from gitseg import RESEARCH_USE
from gitseg.data.cache import Cache
from gitseg.data.geometry import orientation_problems
from gitseg.data.uwmgi import CLASSES
from gitseg.records import Member, TrainingData

# A scan is refused when its field of view lies more than FOV_FACTOR outside the training range
# (above max x 1.5 or below min / 1.5), or its pixel or slice spacing more than SPACING_FACTOR.
FOV_FACTOR = 1.5
SPACING_FACTOR = 2.0
# An empty organ is worth a line when the training scans held it at least this often and the
# scan covers at least the shortest training scan's extent head to feet.
USUAL_ORGAN_SHARE = 0.5
FORCE_HINT = ("Pass --force to predict anyway (the warnings are then recorded in the outputs); the results of an "
              "input unlike the training data are not to be trusted")


class InputRefused(ValueError):
    """A scan outside what the ensemble was trained on; the message lists every problem found."""


def training_data(cache: Cache, case_days: list[str]) -> TrainingData:
    """The range of `case_days`' scans in `cache` (the case-days an ensemble's members trained on)."""
    entries = [cache.entries[cd] for cd in case_days]
    if not entries:
        raise ValueError("no training case-days to describe")

    def span(values) -> list:
        return [min(values), max(values)]

    return TrainingData(
        case_days=len(entries),
        slices=span([int(e["slices"]) for e in entries]),
        slice_mm=span([float(e["spacing"][0]) for e in entries]),
        pixel_mm=span([float(s) for e in entries for s in e["spacing"][1:]]),
        fov_mm=span([float(e["spacing"][1]) * e["height"] for e in entries]
                    + [float(e["spacing"][2]) * e["width"] for e in entries]),
        extent_mm=span([float(e["spacing"][0]) * e["slices"] for e in entries]),
        organ_share=[float(np.mean([e["organ_voxels"][c] > 0 for e in entries])) for c in range(len(CLASSES))])


def window_span(members: list[Member]) -> int:
    """Slices the widest 2.5D window of `members` reads around each slice (3 channels, stride 2: 5)."""
    return max((m.channels - 1) * m.stride + 1 for m in members)


def scan_problems(shape, spacing, members: list[Member], training: TrainingData | None,
                  affine_lps: np.ndarray | None = None) -> list[str]:
    """Why a scan of `shape` `(D, H, W)` and `spacing` `(slice, row, column)` mm is unlike what the
    ensemble was trained on; empty when nothing is. `affine_lps` (None for a Kaggle tree, which has
    no geometry) adds the orientation check."""
    depth, height, width = (int(v) for v in shape)
    slice_mm, row_mm, col_mm = (float(v) for v in spacing)
    problems = []
    span = window_span(members)
    if depth < span:
        windows = ", ".join(sorted({"1 slice" if m.channels == 1 else f"{m.channels} slices {m.stride} apart"
                                    for m in members}))
        trained = f"; it was trained on scans of {_range(training.slices, '')} slices" if training else ""
        problems.append(f"the scan has {depth} slice{'s' if depth != 1 else ''}, fewer than the {span} its 2.5D input "
                        f"reads around each slice ({windows}){trained}")
    if affine_lps is not None:
        problems += orientation_problems(affine_lps)
    if training is None:
        return problems
    fov = (row_mm * height, col_mm * width)
    if not all(_within(v, training.fov_mm, FOV_FACTOR) for v in fov):
        problems.append(f"the field of view is {fov[0]:.0f} x {fov[1]:.0f} mm (rows x columns); the ensemble was "
                        f"trained on {_range(training.fov_mm, ' mm')}")
    if not all(_within(v, training.pixel_mm, SPACING_FACTOR) for v in (row_mm, col_mm)):
        problems.append(f"the pixel spacing is {row_mm:.2f} x {col_mm:.2f} mm; the ensemble was trained on "
                        f"{_range(training.pixel_mm, ' mm', '{:.2f}')}")
    if depth > 1 and not _within(slice_mm, training.slice_mm, SPACING_FACTOR):
        problems.append(f"the slices are {slice_mm:.2f} mm apart; the ensemble was trained on "
                        f"{_range(training.slice_mm, ' mm', '{:.2f}')}")
    return problems


def refuse_or_warn(problems: list[str], what: str, force: bool, log) -> list[str]:
    """Raise InputRefused listing `problems` of `what` (a scan's name), or with `force` log them as
    warnings and return them (to be recorded in the outputs)."""
    if not problems:
        return []
    if not force:
        raise InputRefused(f"{what} is unlike the scans the ensemble was trained on: " + "; ".join(problems)
                           + f". {FORCE_HINT}")
    warnings = [f"{what}: {p}" for p in problems]
    for w in warnings:
        log(f"predict: warning (--force): {w}")
    return warnings


def output_description(forced: bool) -> str:
    """The short description every output carries (at most 64 characters: DICOM's LO): the
    research-use notice, and whether the input checks were forced."""
    return ("Input checks forced; " if forced else "") + RESEARCH_USE


def empty_organs(masks: np.ndarray, spacing, training: TrainingData | None) -> list[str]:
    """One line per organ the prediction left empty although the scan's range should hold it: the
    training scans held it in most case-days and this scan is at least as long as the shortest of
    them. Without training data (older ensembles) every empty organ gets its line."""
    extent = masks.shape[1] * float(spacing[0])
    lines = []
    for c, cls in enumerate(CLASSES):
        if masks[c].any():
            continue
        if training is None:
            lines.append(f"no {cls.replace('_', ' ')} found")
        elif training.organ_share[c] >= USUAL_ORGAN_SHARE and extent >= training.extent_mm[0]:
            lines.append(f"no {cls.replace('_', ' ')} found, although the scan covers {extent:.0f} mm head to feet "
                         f"and {training.organ_share[c]:.0%} of the training scans "
                         f"({_range(training.extent_mm, ' mm')}) held one: review the scan and the result")
    return lines


def _within(value: float, bounds, factor: float) -> bool:
    return bounds[0] / factor <= value <= bounds[1] * factor


def _range(bounds, unit: str, fmt: str = "{:.0f}") -> str:
    lo, hi = (fmt.format(b) for b in bounds)
    return f"{lo}{unit}" if lo == hi else f"{lo}-{hi}{unit}"
