"""The layouts `gitseg prepare` reads, behind one interface: each gives its labelled case-days as jobs.

    uwmgi    the Kaggle UW-Madison tree (train.csv, train/<case>/<case_day>/scans/*.png)
    nnunet   an nnU-Net raw data set (dataset.json, imagesTr/, labelsTr/): gitseg/data/nnunet.py
    dicom    a folder of patients, MR series with RT Structure Sets: gitseg/data/rtstruct.py

A job is what prepare needs to build one cache entry: the files it reads (their names, sizes and
modification times make the entry's key, so an unchanged case-day is not built again), where the
scan came from (`origin`, kept in the entry: export and predict find the scan again with it), and
a `load` that returns the volume in the standard axial display with the entry's geometry.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from gitseg.data.geometry import axial_affine
from gitseg.data.nnunet import index_nnunet, load_nnunet_case
from gitseg.data.rtstruct import index_dicom, load_dicom_case
from gitseg.data.uwmgi import (
    CLASSES,
    DataFormatError,
    Volume,
    index_root,
    parse_case_day,
    problems_by_case_day,
    volume_from_rows,
)

FORMATS = ("auto", "uwmgi", "nnunet", "dicom")


@dataclasses.dataclass
class Job:
    case: int
    day: int
    key_parts: list[str]          # what the entry's key hashes beside the cache settings
    load: Callable[[], tuple[Volume, dict]]  # picklable: (volume, extra entry fields)
    origin: dict | None = None    # None for the Kaggle tree (its case-day names find the scan)


def detect_format(root) -> str:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist or is not a folder; point --data at a UWMGI root "
                                f"(train.csv), an nnU-Net data set (dataset.json) or a folder of DICOM patients")
    if (root / "dataset.json").is_file():
        return "nnunet"
    if (root / "train.csv").is_file() or (root / "train").is_dir():
        return "uwmgi"
    files = (p for p in root.rglob("*") if p.is_file())
    if any(p.suffix.lower() == ".dcm" or _dicom_preamble(p) for _, p in zip(range(200), files)):
        return "dicom"
    raise DataFormatError(f"{root}: not a UWMGI root (train.csv), an nnU-Net data set (dataset.json) or a folder "
                          f"of DICOM files; say which with --format")


def _dicom_preamble(path: Path) -> bool:
    """Whether a file starts as a DICOM file does (128 bytes, then "DICM"): exports often have no suffix."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _file_key(paths) -> list[str]:
    parts = []
    for path in paths:
        stat = os.stat(path)
        parts.append(f"{Path(path).name}|{stat.st_size}|{stat.st_mtime_ns}\n")
    return parts


def _load_uwmgi(rows) -> tuple[Volume, dict]:
    return volume_from_rows(rows), {}


def index_source(root, fmt: str = "auto", labels: str | None = None, case_pattern: str | None = None,
                 rois: str | None = None) -> tuple[str, dict[str, Job], dict[str, list[str]], list[str]]:
    """(format, {case_day: Job}, problems by case-day, problems of no case-day) of a data set."""
    fmt = detect_format(root) if fmt == "auto" else fmt
    if fmt != "nnunet" and (labels or case_pattern):
        raise ValueError(f"--labels and --case-pattern are for nnU-Net data sets; {root} is read as {fmt}")
    if fmt != "dicom" and rois:
        raise ValueError(f"--rois is for DICOM data sets with RT Structure Sets; {root} is read as {fmt}")
    if fmt == "uwmgi":
        slices, problems = index_root(root, "train")
        bad, loose = problems_by_case_day(problems)
        jobs = {}
        for case_day, rows in slices.groupby("case_day", sort=False):
            if case_day in bad:
                continue
            first = rows.iloc[0]
            # The key of a Kaggle entry as caches built before the other layouts hold it: per slice its
            # file's name, size and mtime, then its RLE text.
            parts = []
            for path, *rles in rows[["path", *CLASSES]].itertuples(index=False, name=None):
                stat = os.stat(path)
                parts.append(f"{Path(path).name}|{stat.st_size}|{stat.st_mtime_ns}|"
                             + "|".join("" if not isinstance(r, str) else r for r in rles))
            jobs[case_day] = Job(int(first["case"]), int(first["day"]), parts, functools.partial(_load_uwmgi, rows))
        return fmt, jobs, bad, loose
    if fmt == "nnunet":
        found, problems = index_nnunet(root, labels=labels, case_pattern=case_pattern)
    elif fmt == "dicom":
        found, problems = index_dicom(root, rois=rois)
    else:
        raise ValueError(f"--format {fmt!r}: one of {', '.join(FORMATS)}")
    jobs = {}
    for case_day, (files, origin, load) in found.items():
        case, day = parse_case_day(case_day)
        jobs[case_day] = Job(case, day, [*_file_key(files), json.dumps(origin, sort_keys=True)], load, origin)
    return fmt, jobs, {}, list(problems)  # these layouts' problems name files: a case-day with one has no job


def job_key(job: Job, settings) -> str:
    """The entry's key: the cache settings (format, size, normalisation) and what the job reads."""
    digest = hashlib.sha1(json.dumps(settings).encode())
    digest.update("".join(job.key_parts).encode())
    return digest.hexdigest()


def source_volumes(manifest: dict, entries: list[dict]):
    """Each entry's scan as read from its source, in the standard display: yields (entry, `(D, H, W)`
    image, its LPS affine; for the Kaggle tree, its spacing as geometry.axial_affine gives it). One
    at a time; the Kaggle tree is indexed once for all of them. A scan the source no longer holds is
    a FileNotFoundError naming it."""
    root = Path(manifest["source"])
    kaggle = {e["case_day"] for e in entries if e.get("origin") is None}
    slices = None
    if kaggle:
        slices, problems = index_root(root, "train", case_days=kaggle)
        missing = sorted(kaggle - set(slices["case_day"]))
        if missing or problems:
            raise FileNotFoundError(f"the scans of {len(missing) or len(problems)} case-day(s) are not readable in "
                                    f"{root} ({(problems or missing)[0]}); is it the data set the cache was prepared "
                                    f"from?")
    for entry in entries:
        origin = entry.get("origin")
        if origin is None:
            volume = volume_from_rows(slices[slices["case_day"] == entry["case_day"]])
            yield entry, volume.image, axial_affine(volume.spacing)
            continue
        if origin["format"] == "nnunet":
            volume, extra = load_nnunet_case(str(root / origin["image"]), str(root / origin["label"]),
                                             [tuple(v) for v in origin["values"]])
        elif origin["format"] == "dicom":
            volume, extra = load_dicom_case(str(root), origin)
        else:
            raise DataFormatError(f"{entry['case_day']}: unknown source format {origin['format']!r}")
        yield entry, volume.image, np.asarray(extra["affine"])
