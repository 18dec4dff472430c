"""Patient space: one convention for every volume gitseg reads and every output it writes.

A volume is stored `(D, H, W)`: slice, row, column. Its geometry is a 4x4 affine from voxel
indices (column i, row j, slice k, 1) to DICOM patient coordinates (LPS, mm: +x toward the
patient's left, +y toward posterior, +z toward the head). NIfTI files hold the same volume with
axes (column, row, slice) and the RAS affine `LPS_TO_RAS @ affine`.

The Kaggle tree carries no geometry, only the spacing in its file names. Its slices are axial
as radiology displays them (the patient's right on the image's left, anterior at the top), and a
case-day's slices run from head to feet (the stomach is only on low slice numbers, docs/DATA.md):
`axial_affine`. `gitseg synth --dicom` writes its series with exactly that geometry, so a scan
predicted from the tree and the same scan predicted as a DICOM series land in the same place.
"""

from __future__ import annotations

import numpy as np

# ImageOrientationPatient of the standard axial display: along a row toward the patient's left
# (+x), down a column toward posterior (+y).
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Direction letters of LPS's axes, for the positive and the negative direction.
_LETTERS = (("L", "R"), ("P", "A"), ("S", "I"))
_PLANES = {0: "sagittal", 1: "coronal", 2: "axial"}  # the plane whose normal is this axis
# A slice counts as axial when its normal is within this angle of the head-feet axis (scanners tilt
# axial stacks by a few degrees; 30 degrees is already far from any training scan).
MAX_TILT_DEGREES = 30.0


def axial_affine(spacing) -> np.ndarray:
    """LPS affine of a volume of the Kaggle layout: spacing `(slice, row, column)` mm, columns toward
    the patient's left, rows toward posterior, slices head to feet, the first voxel at the origin."""
    thickness, row_mm, col_mm = (float(s) for s in spacing)
    return np.diag([col_mm, row_mm, -thickness, 1.0])


def spacing_of(affine_lps: np.ndarray) -> tuple[float, float, float]:
    """(slice, row, column) spacing in mm of a volume with LPS affine `affine_lps`."""
    norms = np.linalg.norm(np.asarray(affine_lps, dtype=float)[:3, :3], axis=0)  # column, row, slice
    return float(norms[2]), float(norms[1]), float(norms[0])


def ras_affine(affine_lps: np.ndarray) -> np.ndarray:
    """The NIfTI (RAS) affine of a volume stored (column, row, slice) with LPS affine `affine_lps`."""
    return LPS_TO_RAS @ np.asarray(affine_lps, dtype=float)


def axis_codes(affine_lps: np.ndarray) -> tuple[str, str, str]:
    """Where the column, row and slice indices run in the patient, as letters (L/R, P/A, S/I):
    ("L", "P", "I") for the standard axial volume. Each axis takes its dominant direction."""
    codes = []
    for axis in range(3):
        direction = np.asarray(affine_lps, dtype=float)[:3, axis]
        main = int(np.argmax(np.abs(direction)))
        codes.append(_LETTERS[main][0 if direction[main] > 0 else 1])
    return tuple(codes)


def plane_problem(affine_lps: np.ndarray) -> str:
    """Empty when the slices are axial (within MAX_TILT_DEGREES); else what plane they are."""
    affine = np.asarray(affine_lps, dtype=float)
    unit = [affine[:3, a] / (np.linalg.norm(affine[:3, a]) or 1.0) for a in range(3)]
    normal = np.cross(unit[0], unit[1])
    main = int(np.argmax(np.abs(normal)))
    tilt = float(np.degrees(np.arccos(min(1.0, abs(normal[2])))))
    if tilt > MAX_TILT_DEGREES:
        return (f"the slices are {_PLANES[main]} (normal {np.round(normal, 2).tolist()}, {tilt:.0f} degrees from "
                f"the head-feet axis)")
    return ""


def orientation_problems(affine_lps: np.ndarray) -> list[str]:
    """What keeps a volume from being the standard axial display the models learnt: slices that are
    not axial, or rows and columns that run another way in-plane. Empty when it is standard."""
    plane = plane_problem(affine_lps)
    if plane:
        return [f"{plane}; the ensemble was trained on axial slices"]
    codes = axis_codes(affine_lps)
    if codes[:2] != ("L", "P"):
        return [f"in-plane, columns run toward the patient's {_word(codes[0])} and rows toward {_word(codes[1])} "
                f"(axes {''.join(codes[:2])}); the ensemble was trained on the standard axial display (LP: the "
                f"patient's left on the image's right, anterior at the top), so its anatomy would be mirrored or "
                f"rotated"]
    return []


def _word(letter: str) -> str:
    return {"L": "left", "R": "right", "P": "posterior", "A": "anterior", "S": "head", "I": "feet"}[letter]


# ---------------------------------------------------------------------------------------------
# Bringing a volume to the standard axial display (training data from NIfTI and DICOM sources)


class Reorientation:
    """The axis permutation and flips that bring a volume stored `(D, H, W)` with LPS affine `affine`
    to the standard axial display (columns toward the patient's left, rows toward posterior, slices
    head to feet: axes LPI), and back. Only whole-axis permutations and flips: no resampling, so the
    voxels are the source's own and `backward` gives an output on exactly the source's grid.

    Each voxel axis goes to the patient axis it runs most along; a volume whose slices lie more than
    MAX_TILT_DEGREES from axial is refused by `orientation_problems` before this is used."""

    def __init__(self, affine_lps, shape):
        affine = np.asarray(affine_lps, dtype=float)
        mains = [int(np.argmax(np.abs(affine[:3, c]))) for c in range(3)]  # voxel axis (col, row, slice) -> LPS axis
        if sorted(mains) != [0, 1, 2]:
            raise ValueError(f"the voxel axes of affine {np.round(affine[:3, :3], 3).tolist()} do not run along "
                             f"three different patient axes; cannot bring the volume to axial slices")
        self.source_of = [mains.index(t) for t in range(3)]  # standard voxel axis t <- source voxel axis
        # target directions: +x (left), +y (posterior), -z (feet)
        self.flips = [(affine[t, self.source_of[t]] > 0) != (t < 2) for t in range(3)]
        self.shape = tuple(int(n) for n in shape)  # the source's (D, H, W)
        sizes = {c: self.shape[2 - c] for c in range(3)}  # voxel axis -> length
        to_source = np.zeros((4, 4))
        to_source[3, 3] = 1.0
        for t, s in enumerate(self.source_of):
            to_source[s, t] = -1.0 if self.flips[t] else 1.0
            to_source[s, 3] = sizes[s] - 1.0 if self.flips[t] else 0.0
        self.source_affine = affine
        self.affine = affine @ to_source  # the standard volume's LPS affine
        # array axes: (D, H, W) is (slice, row, column) = voxel axes (2, 1, 0)
        self._axes = tuple(2 - self.source_of[2 - a] for a in range(3))
        self._flip_axes = tuple(2 - t for t in range(3) if self.flips[t])

    @property
    def identity(self) -> bool:
        return self._axes == (0, 1, 2) and not self._flip_axes

    def forward(self, array: np.ndarray) -> np.ndarray:
        """Source `(..., D, H, W)` -> standard order."""
        lead = array.ndim - 3
        out = np.transpose(array, (*range(lead), *(lead + a for a in self._axes)))
        if self._flip_axes:
            out = np.flip(out, tuple(lead + a for a in self._flip_axes))
        return np.ascontiguousarray(out)

    def backward(self, array: np.ndarray) -> np.ndarray:
        """Standard `(..., D, H, W)` -> the source's order and grid."""
        lead = array.ndim - 3
        if self._flip_axes:
            array = np.flip(array, tuple(lead + a for a in self._flip_axes))
        inverse = tuple(int(i) for i in np.argsort(self._axes))
        return np.ascontiguousarray(np.transpose(array, (*range(lead), *(lead + a for a in inverse))))


def nifti_reorientation(affine_lps, shape) -> Reorientation:
    """How to bring a NIfTI volume to the axial display: its axis order is only how it is stored, so any
    order will do; ValueError for an oblique volume, whose axes lie more than MAX_TILT_DEGREES off the
    patient's. (A DICOM series' rows and columns are its acquisition plane: read_series keeps them.)"""
    reorient = Reorientation(affine_lps, shape)
    plane = plane_problem(reorient.affine)
    if plane:
        raise ValueError(f"brought to axial order, {plane}; gitseg's models read axial slices")
    return reorient
