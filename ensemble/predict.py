"""`gitseg predict`: an ensemble folder + a UWMGI tree → submission.csv and NIfTI masks.

The submission is written volume by volume and flushed, so a failure in a later volume never
loses what is already written; bad files are reported per file and their case-day is skipped.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ensemble.model import EnsembleModel
from gitseg.data.cache import problems_by_case_day
from gitseg.data.uwmgi import CLASSES, DataFormatError, index_root, rle_encode, volume_from_rows
from gitseg.progress import say

SUBMISSION_COLUMNS = ("id", "class", "predicted")


def nifti_affine(spacing) -> np.ndarray:
    """Voxel → RAS+ mm for arrays stored (x=column, y=row, z=slice).

    Columns run to the patient's left and rows to posterior (radiological display of an axial
    slice); slice numbers run from head to feet in this data (the stomach is only on low slice
    numbers, DATA.md). The scan is written with the same affine, so the labels overlay it
    exactly in any viewer whatever the true anatomical direction.
    """
    thickness, row_mm, col_mm = spacing
    return np.diag([col_mm, -row_mm, -thickness, 1.0])


def label_volume(probs: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """uint8 `(D, H, W)` labels 1..3 in class order; where masks overlap, the more probable class."""
    scored = np.where(masks, probs.astype(np.float32), -1.0)
    best = scored.argmax(axis=0)
    return np.where(masks.any(axis=0), best + 1, 0).astype(np.uint8)


def write_nifti(path: Path, volume: np.ndarray, spacing) -> None:
    """Write `(D, H, W)` as NIfTI with axes (x, y, z) = (column, row, slice) and the spacing in mm."""
    import nibabel as nib

    data = np.ascontiguousarray(np.transpose(volume, (2, 1, 0)))  # (W, H, D)
    image = nib.Nifti1Image(data, nifti_affine(spacing))
    image.header.set_xyzt_units("mm")
    tmp = path.with_name(f".{path.name}.tmp.nii.gz")
    nib.save(image, tmp)
    tmp.replace(path)


def predict_tree(ensemble_dir, data_root, out, nifti=None, split: str = "test", device=None, log=say) -> dict:
    """Predict every case-day of `data_root/<split>`; returns {written: [...], failed: {case_day: [problems]}}."""
    model = EnsembleModel.load(ensemble_dir, device)
    slices, problems = index_root(data_root, split)
    bad, loose = problems_by_case_day(problems)
    failed: dict[str, list[str]] = {cd: msgs for cd, msgs in bad.items()}
    if loose:
        failed["(tree)"] = loose
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    nifti = Path(nifti) if nifti else None
    if nifti:
        nifti.mkdir(parents=True, exist_ok=True)
    submission = out / "submission.csv"
    case_days = [cd for cd in dict.fromkeys(slices["case_day"]) if cd not in failed]
    written = []
    with open(submission, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(SUBMISSION_COLUMNS)
        f.flush()
        for i, case_day in enumerate(case_days):
            try:
                volume = volume_from_rows(slices[slices["case_day"] == case_day])
                probs, masks = model.predict_scan(volume.image)
            except (DataFormatError, OSError, ValueError) as exc:
                failed[case_day] = [str(exc), *getattr(exc, "problems", [])]
                log(f"predict: {case_day} failed: {exc}")
                continue
            rows = [(sid, cls, rle_encode(masks[c, z]))
                    for z, sid in enumerate(volume.slice_ids) for c, cls in enumerate(CLASSES)]
            writer.writerows(rows)
            f.flush()
            if nifti:
                write_nifti(nifti / f"{case_day}.nii.gz", label_volume(probs, masks), volume.spacing)
                write_nifti(nifti / f"{case_day}_scan.nii.gz", volume.image, volume.spacing)
            written.append(case_day)
            log(f"predict: {i + 1}/{len(case_days)} {case_day} ({len(volume.slice_ids)} slices)")
    for case_day, msgs in failed.items():
        for msg in msgs:
            log(f"predict: problem in {case_day}: {msg}")
    log(f"predict: {submission}: {len(written)} case-day(s)" + (f"; {len(failed)} failed" if failed else "")
        + (f"; NIfTI in {nifti}" if nifti else ""))
    return {"written": written, "failed": failed, "submission": str(submission)}
