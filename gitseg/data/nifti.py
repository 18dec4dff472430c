"""NIfTI volumes in and out, in the one patient-space convention (gitseg/data/geometry.py), and the
label table that names the organs of a label volume for viewers.

Every NIfTI file gitseg writes (predict from a Kaggle tree, a DICOM series or a NIfTI volume) goes
through `write_volume`, so the two predict paths cannot disagree about left and right.

Label values: 0 background, then 1, 2, 3 in class order (large bowel, small bowel, stomach).
`write_label_table` puts two small text files beside the labels: `labels.ctbl` (3D Slicer's
colour table: `value name R G B A`) and `labels.itksnap.txt` (ITK-SNAP's label descriptions,
Segmentation > Import Label Descriptions), both with the TG-263 names.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gitseg.data.geometry import LPS_TO_RAS, ras_affine
from gitseg.files import atomic_path, write_text_atomic

# TG-263 structure names and display colours, in class order (large_bowel, small_bowel, stomach):
# the names of the RT Structure Set's ROIs, the SEG's segment labels and the label tables.
TG263 = ("Bowel_Large", "Bowel_Small", "Stomach")
COLOURS = ((205, 133, 63), (255, 182, 193), (0, 128, 255))
SLICER_TABLE, ITKSNAP_TABLE = "labels.ctbl", "labels.itksnap.txt"


def write_volume(path, volume: np.ndarray, affine_lps: np.ndarray, description: str = "") -> None:
    """Write `(D, H, W)` as NIfTI with axes (column, row, slice), the RAS affine of `affine_lps` and
    mm units; `description` (at most 79 characters) goes in the header's descrip field."""
    import nibabel as nib  # only NIfTI output needs it

    data = np.ascontiguousarray(np.transpose(volume, (2, 1, 0)))  # (W, H, D)
    image = nib.Nifti1Image(data, ras_affine(affine_lps))
    image.header.set_xyzt_units("mm")
    if description:
        image.header["descrip"] = description[:79].encode("ascii", "replace")
    with atomic_path(path, suffix=".nii.gz") as tmp:  # nibabel picks the format from the name
        nib.save(image, tmp)


def read_volume(path) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI volume as float32 `(D, H, W)` (slice, row, column: the array's z, y, x) and its LPS
    affine for (column, row, slice) indices, so it goes through the same steps as a DICOM series."""
    import nibabel as nib  # only NIfTI input needs it

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; --nifti-in takes a NIfTI file (.nii or .nii.gz)")
    try:
        image = nib.load(path)
    except Exception as exc:  # nibabel raises several types for a file that is not NIfTI
        raise ValueError(f"{path} cannot be read as NIfTI ({exc})") from None
    data = np.asarray(image.dataobj, dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"{path} holds a {data.ndim}-D image of shape {data.shape}; give one 3-D volume")
    return np.ascontiguousarray(np.transpose(data, (2, 1, 0))), LPS_TO_RAS @ image.affine


def label_volume(probs: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """uint8 `(D, H, W)` labels 1..3 in class order; where masks overlap, the more probable class."""
    scored = np.where(masks, probs.astype(np.float32), -1.0)
    best = scored.argmax(axis=0)
    return np.where(masks.any(axis=0), best + 1, 0).astype(np.uint8)


def write_label_table(folder) -> list[Path]:
    """The label tables of gitseg's label volumes in `folder` (3D Slicer's and ITK-SNAP's formats)."""
    folder = Path(folder)
    slicer = ["# 3D Slicer colour table of gitseg's label volumes: value name R G B A"]
    slicer += ["0 Background 0 0 0 0"] + [f"{c + 1} {name} {r} {g} {b} 255"
                                          for c, (name, (r, g, b)) in enumerate(zip(TG263, COLOURS))]
    itksnap = ["# ITK-SNAP label descriptions of gitseg's label volumes",
               "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL",
               '    0     0    0    0     0  0  0    "Clear Label"']
    itksnap += [f'{c + 1:5d} {r:5d} {g:4d} {b:4d}     1  1  1    "{name}"'
                for c, (name, (r, g, b)) in enumerate(zip(TG263, COLOURS))]
    paths = [folder / SLICER_TABLE, folder / ITKSNAP_TABLE]
    for path, lines in zip(paths, (slicer, itksnap)):
        write_text_atomic(path, "\n".join(lines) + "\n")
    return paths
