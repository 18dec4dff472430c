"""Contoured DICOM cases for training: MR series with the RT Structure Sets drawn on them.

    gitseg prepare --data PATIENTS --out CACHE [--rois large_bowel=Colon,small_bowel=Bowel_Small,...]

PATIENTS holds the DICOM files in any folder structure (one folder per patient, per study or per
series; any file names). Every MR image and every RT Structure Set is found by its header: a series
is its SeriesInstanceUID's slices, an RTSTRUCT belongs to the series its
ReferencedFrameOfReferenceSequence names (RTReferencedSeriesSequence). Case identity: the
PatientID; its series, ordered by study and series date and time then series number, are its
days 0, 1, ... (the cache's case numbers are the patients in PatientID order, from 1).

ROIs map to gitseg's classes by name, case-insensitive: the TG-263 names (`Bowel_Large`,
`Bowel_Small`, `Stomach`) and gitseg's class names by default, or `--rois` (`class=ROI name`, or
`class=none` for an organ not contoured in this data set; `stomach=Magen|Stomach` where cases name it
differently). Contours are rasterised onto the
series' grid: each contour's points go to pixel coordinates through the series' affine, the
slice is the one the points lie on (a contour off the slices' planes is an error), and a slice's
polygons are filled with the even-odd rule, so that holes and islands in holes come out as
drawn (as planning systems and gitseg's own RTSTRUCT writer treat nested contours).

Problems, each naming the file: a series without an RTSTRUCT, an RTSTRUCT whose series is not in
the folder, two RTSTRUCTs for one series, an ROI that is missing or has no contours, a contour off
the planes or outside the image. `--skip-bad` leaves the case-day out and records why.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from gitseg.data.dicom import DicomSeriesError, read_series
from gitseg.data.geometry import Reorientation, plane_problem, spacing_of
from gitseg.data.nifti import TG263
from gitseg.data.uwmgi import CLASSES, DataFormatError, Volume, case_day_name

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
# How far (in slices) a contour's points may lie from a slice's plane: scanners and planning
# systems round positions to 0.01 mm or so; a quarter slice is far from any rounding.
PLANE_TOLERANCE = 0.25


def parse_roi_mapping(text: str | None) -> dict[str, str]:
    """`large_bowel=Colon,stomach=none` -> {class: ROI name or "none"}; other classes keep the default."""
    if not text:
        return {}
    mapping = {}
    for part in text.split(","):
        name, sep, roi = part.partition("=")
        if not sep or name.strip() not in CLASSES or not roi.strip():
            raise ValueError(f"--rois {text!r}: each item is CLASS=ROI NAME with CLASS one of {', '.join(CLASSES)} "
                             f"(e.g. large_bowel=Bowel_Large, or stomach=Magen|Stomach for either name)")
        mapping[name.strip()] = roi.strip()
    return mapping


def roi_names(mapping: dict[str, str]) -> list[tuple[str, ...]]:
    """Per class, the ROI names (lower case) that are that class; empty: not contoured."""
    names = []
    for c, cls in enumerate(CLASSES):
        given = mapping.get(cls)
        if given is None:
            names.append((TG263[c].lower(), cls))
        elif given.lower() == "none":
            names.append(())
        else:
            names.append(tuple(n.strip().lower() for n in given.split("|")))
    return names


def _header(path: Path):
    import pydicom  # heavy: only DICOM sources need it
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError):
        return None


def referenced_series(ds) -> list[str]:
    """The SeriesInstanceUIDs an RT Structure Set's ReferencedFrameOfReferenceSequence names."""
    uids = []
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
        for study in frame.get("RTReferencedStudySequence", []):
            for series in study.get("RTReferencedSeriesSequence", []):
                uids.append(str(series.SeriesInstanceUID))
    return uids


def index_dicom(root, rois: str | None = None):
    """The contoured MR series under `root` as prepare's jobs, {case_day: (files, origin, load)},
    and the problems found (series without a structure set and the like), each naming a file."""
    root = Path(root)
    mapping = roi_names(parse_roi_mapping(rois))
    series: dict[str, dict] = {}
    structures: dict[str, list[Path]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        ds = _header(path)
        if ds is None:
            continue
        if ds.get("Modality") == "RTSTRUCT" or ds.get("SOPClassUID") == RT_STRUCTURE_SET_STORAGE:
            refs = referenced_series(ds) or [""]
            for uid in refs:
                structures.setdefault(uid, []).append(path)
        elif ds.get("Modality") == "MR" and "SeriesInstanceUID" in ds:
            s = series.setdefault(str(ds.SeriesInstanceUID), {"files": [], "patient": str(ds.get("PatientID", "")),
                                                               "when": (str(ds.get("StudyDate", "")),
                                                                        str(ds.get("StudyTime", "")),
                                                                        str(ds.get("SeriesDate", "")),
                                                                        str(ds.get("SeriesTime", "")),
                                                                        int(ds.get("SeriesNumber", 0) or 0))})
            s["files"].append(path)
    problems = []
    for uid, paths in structures.items():
        if uid not in series:
            what = f"series {uid}" if uid else "no series (ReferencedFrameOfReferenceSequence is empty)"
            problems.extend(f"{p}: an RT Structure Set for {what}, which is not under {root}" for p in paths)
    paired = {}
    for uid, s in series.items():
        found = structures.get(uid, [])
        if not found:
            problems.append(f"{s['files'][0].parent}: MR series {uid} ({len(s['files'])} slices, patient "
                            f"{s['patient'] or '?'}) has no RT Structure Set referencing it")
        elif len(found) > 1:
            problems.append(f"{found[0]}: {len(found)} RT Structure Sets reference series {uid} "
                            f"({', '.join(str(p) for p in found)}); keep one")
        else:
            paired[uid] = (s, found[0])
    if not series:
        raise DataFormatError(f"{root} holds no MR image series")
    patients = sorted({s["patient"] for s, _ in paired.values()})
    jobs = {}
    for case, patient in enumerate(patients, start=1):
        days = sorted((s["when"], uid) for uid, (s, _) in paired.items() if s["patient"] == patient)
        for day, (_, uid) in enumerate(days):
            s, rtstruct = paired[uid]
            origin = {"format": "dicom", "patient": patient, "series": uid,
                      "files": [str(p.relative_to(root)) for p in s["files"]],
                      "rtstruct": str(rtstruct.relative_to(root)), "rois": [list(n) for n in mapping]}
            jobs[case_day_name(case, day)] = ([*s["files"], rtstruct], origin,
                                              functools.partial(load_dicom_case, str(root), origin))
    return jobs, problems


def load_dicom_case(root: str, origin: dict) -> tuple[Volume, dict]:
    """One contoured series: the image (head first, as read_series stores it) and its class masks."""
    root = Path(root)
    files = [root / f for f in origin["files"]]
    try:
        series = read_series(files[0].parent, files=files)
    except DicomSeriesError as exc:
        raise DataFormatError(str(exc)) from None
    plane = plane_problem(series.affine)
    if plane:
        raise DataFormatError(f"{files[0]}: {plane}; gitseg trains on axial slices")
    masks = structure_masks(root / origin["rtstruct"], series, [tuple(n) for n in origin["rois"]])
    reorient = Reorientation(series.affine, series.image.shape)
    volume = Volume(case_day="", image=reorient.forward(series.image), masks=reorient.forward(masks),
                    spacing=spacing_of(reorient.affine), slice_ids=[], labelled=True)
    return volume, {"affine": reorient.affine.tolist(), "source_affine": series.affine.tolist()}


def structure_masks(path, series, names: list[tuple[str, ...]], allow_empty: bool = False) -> np.ndarray:
    """bool `(3, D, H, W)` of an RT Structure Set on `series`' grid (series order), the ROIs chosen by
    `names` (per class, the lower-case ROI names that are it). DataFormatError names the file and the
    problem: a class's ROI missing or without contours, a contour off the planes or outside the image."""
    import pydicom  # heavy: only DICOM sources need it

    path = Path(path)
    ds = pydicom.dcmread(path)
    rois = {int(r.ROINumber): str(r.ROIName) for r in ds.get("StructureSetROISequence", [])}
    contours = {int(c.ReferencedROINumber): c.get("ContourSequence", []) for c in ds.get("ROIContourSequence", [])}
    shape = series.image.shape
    masks = np.zeros((len(CLASSES), *shape), bool)
    inverse = np.linalg.inv(series.affine)
    for c, cls in enumerate(CLASSES):
        if not names[c]:
            continue
        numbers = [n for n, name in rois.items() if name.lower() in names[c]]
        if not numbers:
            raise DataFormatError(f"{path}: no ROI named {' or '.join(names[c])} for {cls} (its ROIs: "
                                  f"{', '.join(rois.values()) or 'none'}); map one with --rois {cls}=NAME, or "
                                  f"{cls}=none if the organ is not contoured")
        items = [item for n in numbers for item in contours.get(n, [])]
        if not items and not allow_empty:
            raise DataFormatError(f"{path}: ROI {rois[numbers[0]]} ({cls}) has no contours")
        for item in items:
            points = np.asarray(item.ContourData, dtype=np.float64).reshape(-1, 3)
            pixels = (inverse @ np.column_stack([points, np.ones(len(points))]).T).T[:, :3]
            k = np.rint(pixels[:, 2])
            if np.abs(pixels[:, 2] - k).max() > PLANE_TOLERANCE or len(set(k.tolist())) != 1:
                raise DataFormatError(f"{path}: a contour of ROI {rois[numbers[0]]} lies off the series' slice planes "
                                      f"(slice index {pixels[:, 2].min():.2f} to {pixels[:, 2].max():.2f})")
            z = int(k[0])
            if not 0 <= z < shape[0] or pixels[:, :2].min() < -0.5 or (pixels[:, 0].max() > shape[2] - 0.5
                                                                       or pixels[:, 1].max() > shape[1] - 0.5):
                raise DataFormatError(f"{path}: a contour of ROI {rois[numbers[0]]} lies outside the series' "
                                      f"image (slice {z}, columns and rows up to {pixels[:, 0].max():.0f}, "
                                      f"{pixels[:, 1].max():.0f})")
            masks[c, z] ^= fill_polygon(pixels[:, :2], shape[1:])
    return masks


def fill_polygon(points: np.ndarray, shape) -> np.ndarray:
    """bool `shape` with the pixels a closed polygon of (column, row) points encloses, boundary included."""
    import cv2  # heavy: OpenCV loads only where contours are drawn

    layer = np.zeros(shape, np.uint8)
    cv2.fillPoly(layer, [np.round(points).astype(np.int32)], 1)
    if len(points) <= 2:  # a one- or two-pixel contour: its pixels
        layer[np.round(points[:, 1]).astype(int), np.round(points[:, 0]).astype(int)] = 1
    return layer.astype(bool)
