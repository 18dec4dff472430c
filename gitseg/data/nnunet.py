"""NIfTI data sets in the nnU-Net raw layout: read for `gitseg prepare`, written by `gitseg export --to nnunet`.

The layout (nnU-Net v2's dataset format, also MONAI's and the Medical Segmentation Decathlon's):

    dataset.json                  channel_names, labels, numTraining, file_ending
    imagesTr/<CASE>_0000.nii.gz   one channel per case (gitseg reads one: MR)
    labelsTr/<CASE>.nii.gz        the label map
    imagesTs/, labelsTs/          the same for test cases (gitseg's export puts its holdout there)
    splits_final.json             (gitseg's export) the folds, so that nnU-Net trains on gitseg's split

Labels: `dataset.json`'s `labels` maps a name to a value, or to a list of values for region-based
label sets (nnU-Net's `regions_class_order`), where a voxel belongs to every region whose list holds
its value, so that regions may overlap. gitseg's three classes take the labels named like them (the
class names, the TG-263 names or a few common synonyms, case-insensitive) unless `--labels` says
otherwise: `large_bowel=1,small_bowel=colon_small,stomach=3+5` (a value, values joined by `+`, a
label's name, or `none` for an organ the data set does not contour).

Case identity: folds group scan days of one patient, so prepare needs to know which images belong
together. `--case-pattern` is a regular expression with a group `case` (and optionally `day`) matched
against the image's identifier (its name without `_0000.nii.gz`); by default gitseg's own names
(`case12_day3`, as its export writes them) are read as case and day, and any other identifier is its
own case. Volumes are brought to the axial display the models learn (geometry.Reorientation); the
cache keeps the source's affine, and predictions go back to the source's grid.

The export (gitseg/data/export.py) writes this layout with the label encodings below.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import numpy as np

from gitseg.data.geometry import Reorientation, nifti_reorientation, spacing_of
from gitseg.data.nifti import read_volume
from gitseg.data.uwmgi import CASE_DAY, CLASSES, DataFormatError, Volume, case_day_name

DATASET_JSON = "dataset.json"
SPLITS = "splits_final.json"
CHANNEL = "_0000"
# Names that mean one of gitseg's classes in other data sets (compared lower-case, without spaces,
# dashes or underscores): the class name, its TG-263 name, and common synonyms.
SYNONYMS = {
    "large_bowel": ("largebowel", "bowellarge", "colon", "largeintestine"),
    "small_bowel": ("smallbowel", "bowelsmall", "smallintestine"),
    "stomach": ("stomach",),
}
OVERLAP_CHOICES = ("regions", "priority")


def _plain(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name).lower()


def is_nnunet_root(root) -> bool:
    return (Path(root) / DATASET_JSON).is_file()


def read_dataset_json(root) -> dict:
    path = Path(root) / DATASET_JSON
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataFormatError(f"{path}: cannot be read as JSON ({exc})") from None
    for key in ("channel_names", "labels"):
        if key not in spec:
            raise DataFormatError(f"{path}: no {key!r}; an nnU-Net dataset.json names its channels and labels")
    channels = spec["channel_names"]
    if len(channels) != 1:
        raise DataFormatError(f"{path}: {len(channels)} channels ({channels}); gitseg trains on one MR channel")
    return spec


def parse_label_mapping(text: str | None) -> dict[str, str]:
    """`large_bowel=1,stomach=none` -> {"large_bowel": "1", "stomach": "none"}; names checked."""
    if not text:
        return {}
    mapping = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in CLASSES or not value.strip():
            raise ValueError(f"--labels {text!r}: each item is CLASS=LABEL with CLASS one of {', '.join(CLASSES)} "
                             f"(e.g. large_bowel=1,small_bowel=2,stomach=3)")
        mapping[name] = value.strip()
    return mapping


def label_values(labels: dict, mapping: dict[str, str], where: str) -> list[tuple[int, ...]]:
    """Per gitseg class, the label values that make its mask (empty: the class is not contoured)."""

    def values_of(entry) -> tuple[int, ...]:
        return tuple(int(v) for v in (entry if isinstance(entry, list) else [entry]))

    by_name = {_plain(k): v for k, v in labels.items() if _plain(k) != "background"}
    result = []
    for cls in CLASSES:
        spec = mapping.get(cls)
        if spec is None:
            found = [name for name in SYNONYMS[cls] if name in by_name]
            if not found:
                raise DataFormatError(
                    f"{where}: no label named like {cls} among {', '.join(labels)}; say which with --labels "
                    f"(e.g. --labels {cls}=2, or {cls}=none for an organ the data set does not contour)")
            result.append(values_of(by_name[found[0]]))
        elif spec.lower() == "none":
            result.append(())
        elif re.fullmatch(r"\d+(\+\d+)*", spec):
            result.append(tuple(int(v) for v in spec.split("+")))
        elif _plain(spec) in by_name:
            result.append(values_of(by_name[_plain(spec)]))
        else:
            raise DataFormatError(f"{where}: --labels {cls}={spec}: no such label; the labels are "
                                  f"{', '.join(f'{k}={v}' for k, v in labels.items())}")
    return result


def case_identity(identifiers: list[str], pattern: str | None) -> dict[str, tuple[int, int]]:
    """identifier -> (case, day) numbers. With `pattern`, its groups `case` and `day`; without, gitseg's
    own names are read as case and day and any other identifier is a case of its own (day 0)."""
    regex = re.compile(pattern) if pattern else None
    if regex is not None and "case" not in regex.groupindex:
        raise ValueError(f"--case-pattern {pattern!r} needs a named group (?P<case>...)")
    keys = {}
    for ident in identifiers:
        if regex is not None:
            match = regex.fullmatch(ident)
            if match is None:
                raise DataFormatError(f"image {ident!r} does not match --case-pattern {pattern!r}")
            keys[ident] = (match.group("case"), match.groupdict().get("day") or "")
        elif all(CASE_DAY.match(i) for i in identifiers):
            match = CASE_DAY.match(ident)
            keys[ident] = (match.group(1), match.group(2))
        else:
            keys[ident] = (ident, "")
    cases = sorted({c for c, _ in keys.values()}, key=_natural)
    numeric = all(c.isdigit() for c in cases)
    number = {c: int(c) if numeric else i + 1 for i, c in enumerate(cases)}
    result = {}
    for case in cases:
        days = sorted({d for c, d in keys.values() if c == case}, key=_natural)
        day_number = {d: int(d) if all(x.isdigit() for x in days) else i for i, d in enumerate(days)}
        for ident, (c, d) in keys.items():
            if c == case:
                result[ident] = (number[case], day_number[d])
    names = {}
    for ident, (case, day) in result.items():
        other = names.setdefault((case, day), ident)
        if other != ident:
            raise DataFormatError(f"images {other!r} and {ident!r} are both case {case} day {day}; give a "
                                  f"--case-pattern whose groups tell them apart")
    return result


def _natural(text: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


# ---------------------------------------------------------------------------------------------
# Reading


def index_nnunet(root, labels: str | None = None, case_pattern: str | None = None):
    """The labelled cases of an nnU-Net raw data set (imagesTr, and imagesTs where labelsTs has their
    labels) as prepare's jobs: {case_day: (files, origin, load)}, and the problems found (a missing
    label file, an image of another channel)."""
    root = Path(root)
    spec = read_dataset_json(root)
    ending = spec.get("file_ending", ".nii.gz")
    if ending not in (".nii.gz", ".nii"):
        raise DataFormatError(f"{root / DATASET_JSON}: file_ending {ending!r}; gitseg reads NIfTI (.nii.gz, .nii)")
    values = label_values(spec["labels"], parse_label_mapping(labels), str(root / DATASET_JSON))
    if not (root / "imagesTr").is_dir():
        raise DataFormatError(f"{root}: no imagesTr/ folder beside {DATASET_JSON}")
    problems = []
    found = {}
    # Training cases, and test cases with labels (labelsTs: gitseg's export puts its holdout there);
    # prepare draws its own folds and holdout over all of them.
    for images, labels_dir, required in (("imagesTr", "labelsTr", True), ("imagesTs", "labelsTs", False)):
        if not (root / images).is_dir():
            continue
        for path in sorted((root / images).iterdir()):
            if path.name.startswith(".") or not path.name.endswith(ending):
                continue
            stem = path.name[: -len(ending)]
            if not stem.endswith(CHANNEL):
                problems.append(f"{path}: not <CASE>{CHANNEL}{ending}; gitseg reads one channel, {CHANNEL}")
                continue
            ident = stem[: -len(CHANNEL)]
            label = root / labels_dir / f"{ident}{ending}"
            if not label.is_file():
                if required:
                    problems.append(f"{path}: no label file {label}")
                continue
            if ident in found:
                problems.append(f"{path}: case {ident} is also {found[ident][0]}")
                continue
            found[ident] = (path, label)
    if not found and not problems:
        raise DataFormatError(f"{root / 'imagesTr'} holds no <CASE>{CHANNEL}{ending} image")
    identity = case_identity(list(found), case_pattern)
    jobs = {}
    for ident, (image, label) in found.items():
        case, day = identity[ident]
        origin = {"format": "nnunet", "id": ident, "image": str(image.relative_to(root)),
                  "label": str(label.relative_to(root)), "values": [list(v) for v in values]}
        jobs[case_day_name(case, day)] = ((image, label), origin,
                                          functools.partial(load_nnunet_case, str(image), str(label), values))
    return jobs, problems


def standard_volume(image: np.ndarray, affine: np.ndarray, where: str) -> tuple[np.ndarray, Reorientation]:
    """The volume in the standard axial display, and how to undo it (geometry.nifti_reorientation)."""
    try:
        reorient = nifti_reorientation(affine, image.shape)
    except ValueError as exc:
        raise DataFormatError(f"{where}: {exc}") from None
    return reorient.forward(image), reorient


def load_nnunet_case(image_path: str, label_path: str, values) -> tuple[Volume, dict]:
    """One case: the image and its class masks in the standard display, and the entry's geometry."""
    image, affine = read_volume(image_path)
    labels, label_affine = read_volume(label_path)
    if labels.shape != image.shape:
        raise DataFormatError(f"{label_path}: shape {labels.shape[::-1]} differs from its image's {image.shape[::-1]}")
    if not np.allclose(label_affine, affine, atol=1e-3):
        raise DataFormatError(f"{label_path}: its affine differs from {image_path}'s; the label map is not on the "
                              f"image's grid")
    label_map = np.rint(labels).astype(np.int64)
    declared = {v for vs in values for v in vs}
    unknown = sorted(set(np.unique(label_map).tolist()) - declared - {0})
    if unknown:
        raise DataFormatError(f"{label_path}: label value(s) {unknown} are in no class's mapping "
                              f"({dict(zip(CLASSES, values))}); map them with --labels or fix the label map")
    standard, reorient = standard_volume(image, affine, image_path)
    masks = reorient.forward(np.stack([np.isin(label_map, v) if v else np.zeros(label_map.shape, bool)
                                       for v in values]))
    spacing = spacing_of(reorient.affine)
    volume = Volume(case_day="", image=standard, masks=masks, spacing=spacing, slice_ids=[], labelled=True)
    return volume, {"affine": reorient.affine.tolist(), "source_affine": np.asarray(affine).tolist()}


# ---------------------------------------------------------------------------------------------
# Label maps of an export: gitseg's classes may overlap (the real labels do, between the bowels),
# a label map holds one value per voxel.


def encode_labels(masks: np.ndarray, overlap: str) -> tuple[np.ndarray, list[int]]:
    """uint8 label map of bool `(3, D, H, W)` and the voxels each class loses in it."""
    if overlap == "regions":
        value = masks[0].astype(np.uint8) + 2 * masks[1].astype(np.uint8) + 4 * masks[2].astype(np.uint8)
        return value, [0, 0, 0]
    value = np.zeros(masks.shape[1:], np.uint8)
    for c in range(len(CLASSES)):  # later classes win where masks overlap
        value[masks[c]] = c + 1
    return value, [int((masks[c] & (value != c + 1)).sum()) for c in range(len(CLASSES))]


def decode_labels(value: np.ndarray, overlap: str) -> np.ndarray:
    """bool `(3, ...)` masks of a label map written with `encode_labels` (or predicted in its labels)."""
    value = np.rint(np.asarray(value)).astype(np.int64)
    if overlap == "regions":
        return np.stack([(value >> c) & 1 == 1 for c in range(len(CLASSES))])
    return np.stack([value == c + 1 for c in range(len(CLASSES))])


def dataset_labels(overlap: str) -> tuple[dict, dict]:
    """dataset.json's `labels` (and `regions_class_order` for regions) of an export."""
    if overlap == "regions":
        labels = {"background": 0}
        for c, cls in enumerate(CLASSES):
            labels[cls] = [v for v in range(1, 8) if v & (1 << c)]
        return labels, {"regions_class_order": [1, 2, 4]}
    return {"background": 0, **{cls: c + 1 for c, cls in enumerate(CLASSES)}}, {}
