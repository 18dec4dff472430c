"""What predict checks before inference (ensemble/predict/input_checks.py), the patient-space convention
(gitseg/data/geometry.py) and the label tables (gitseg/data/nifti.py), without a model; the
end-to-end refusals and the two predict paths' agreement are in tests/test_ensemble.py."""

from __future__ import annotations

import re

import numpy as np
import pytest

from ensemble.predict.input_checks import InputRefused, empty_organs, refuse_or_warn, scan_problems
from gitseg.data.geometry import axial_affine, axis_codes, orientation_problems, ras_affine, spacing_of
from gitseg.data.nifti import COLOURS, TG263, write_label_table
from gitseg.records import Member, TrainingData

MEMBERS = [Member(file="a.pt", weight=1.0, size=64, channels=3, stride=2, configuration="c0", fold=0),
           Member(file="b.pt", weight=1.0, size=64, channels=1, stride=1, configuration="c1", fold=0)]
TRAINING = TrainingData(case_days=30, slices=[80, 144], slice_mm=[3.0, 3.0], pixel_mm=[1.5, 1.63],
                        fov_mm=[351.0, 540.0], extent_mm=[240.0, 432.0], organ_share=[1.0, 0.9, 0.2])
TYPICAL = dict(shape=(144, 266, 266), spacing=(3.0, 1.5, 1.5))


def problems(shape=TYPICAL["shape"], spacing=TYPICAL["spacing"], affine="axial"):
    affine = axial_affine(spacing) if isinstance(affine, str) else affine
    return scan_problems(shape, spacing, MEMBERS, TRAINING, affine)


def test_a_scan_like_the_training_scans_passes():
    assert problems() == []
    assert problems(shape=(80, 310, 360), spacing=(3.0, 1.5, 1.5)) == []
    assert problems(affine=None) == []  # a Kaggle tree: no geometry to check


@pytest.mark.parametrize("shape,spacing,expected", [
    ((4, 266, 266), (3.0, 1.5, 1.5),
     r"the scan has 4 slices, fewer than the 5 its 2.5D input reads around each slice \(1 slice, 3 slices 2 apart\); "
     r"it was trained on scans of 80-144 slices"),
    ((144, 64, 64), (3.0, 1.5, 1.5), r"the field of view is 96 x 96 mm \(rows x columns\); the ensemble was trained "
                                     r"on 351-540 mm"),
    ((144, 1330, 1330), (3.0, 0.3, 0.3), r"the pixel spacing is 0.30 x 0.30 mm; the ensemble was trained on "
                                         r"1.50-1.63 mm"),
    ((144, 266, 266), (7.0, 1.5, 1.5), r"the slices are 7.00 mm apart; the ensemble was trained on 3.00 mm"),
])
def test_each_kind_of_implausible_scan_is_named_with_the_training_range(shape, spacing, expected):
    found = problems(shape, spacing)
    assert len(found) == 1 and re.fullmatch(expected, found[0]), found


def test_the_bounds_are_wide_on_purpose():
    """A field of view 1.5x outside the range and a spacing 2x outside it still pass: the networks see
    every scan resized to their input, so only a scan far off is refused."""
    assert problems(shape=(144, 540, 540), spacing=(3.0, 1.5, 1.5)) == []  # 810 mm = 540 x 1.5
    assert problems(shape=(144, 300, 300), spacing=(5.9, 0.79, 0.79)) == []  # 237 mm, 0.79 mm, 5.9 mm


@pytest.mark.parametrize("orientation,expected", [
    ((0, 1, 0, 0, 0, -1), r"the slices are sagittal .*trained on axial slices"),
    ((1, 0, 0, 0, 0, -1), r"the slices are coronal"),
    ((-1, 0, 0, 0, 1, 0), r"in-plane, columns run toward the patient's right and rows toward posterior \(axes RP\)"),
    ((0, 1, 0, 1, 0, 0), r"axes PL"),
])
def test_slices_that_are_not_the_standard_axial_display_are_refused(orientation, expected):
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = row * 1.5, col * 1.5, np.cross(row, col) * -3.0
    found = problems(affine=affine)
    assert len(found) == 1 and re.search(expected, found[0]), found


def test_a_tilted_axial_stack_is_still_axial():
    angle = np.radians(20)
    affine = axial_affine((3.0, 1.5, 1.5))
    rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    affine[:3, :3] = rotation @ affine[:3, :3]
    assert orientation_problems(affine) == [] and spacing_of(affine) == pytest.approx((3.0, 1.5, 1.5))


def test_refusal_lists_every_problem_and_force_returns_them_as_warnings():
    found = problems(shape=(1, 64, 64), spacing=(3.0, 0.31, 0.31))
    assert len(found) == 3
    with pytest.raises(InputRefused, match=r"series 1.2.3 is unlike the scans .*: the scan has 1 slice, .*; the field "
                                           r"of view .*; the pixel spacing .*\. Pass --force to predict anyway"):
        refuse_or_warn(found, "series 1.2.3", force=False, log=print)
    said = []
    warnings = refuse_or_warn(found, "series 1.2.3", force=True, log=said.append)
    assert warnings == [f"series 1.2.3: {p}" for p in found] and len(said) == 3
    assert all(line.startswith("predict: warning (--force): series 1.2.3: ") for line in said)
    assert refuse_or_warn([], "x", force=False, log=print) == []


def test_an_empty_organ_is_said_when_the_scan_should_hold_it():
    masks = np.zeros((3, 144, 8, 8), bool)
    masks[1, 70, 2, 2] = True
    lines = empty_organs(masks, (3.0, 1.5, 1.5), TRAINING)
    # large bowel: always present in training, and the scan is long enough; stomach: rare (20%), not said
    assert len(lines) == 1 and lines[0].startswith("no large bowel found, although the scan covers 432 mm head to "
                                                   "feet and 100% of the training scans (240-432 mm) held one")
    assert empty_organs(masks[:, :20], (3.0, 1.5, 1.5), TRAINING) == []  # 60 mm: the organ may lie outside it
    assert empty_organs(masks, (3.0, 1.5, 1.5), None) == ["no large bowel found", "no stomach found"]


def test_the_kaggle_layout_is_axial_head_first_with_the_patients_left_on_the_images_right():
    affine = axial_affine((3.0, 1.5, 1.25))
    assert axis_codes(affine) == ("L", "P", "I")
    # Voxel (column 10, row 20, slice 2) in mm, LPS then NIfTI's RAS.
    assert affine @ [10, 20, 2, 1] == pytest.approx([12.5, 30.0, -6.0, 1])
    assert ras_affine(affine) @ [10, 20, 2, 1] == pytest.approx([-12.5, -30.0, -6.0, 1])


def test_label_tables_name_every_label_for_slicer_and_itksnap(tmp_path):
    slicer, itksnap = write_label_table(tmp_path)
    rows = [line.split() for line in slicer.read_text().splitlines() if not line.startswith("#")]
    assert [(int(r[0]), r[1]) for r in rows] == [(0, "Background"), *((c + 1, n) for c, n in enumerate(TG263))]
    assert [tuple(map(int, r[2:5])) for r in rows[1:]] == list(COLOURS) and all(r[5] == "255" for r in rows[1:])
    labels = {}
    for line in itksnap.read_text().splitlines():
        if not line.startswith("#"):
            fields = line.split('"')
            numbers = fields[0].split()
            assert len(numbers) == 7  # IDX R G B A VIS MSH
            labels[int(numbers[0])] = fields[1]
    assert labels == {0: "Clear Label", 1: "Bowel_Large", 2: "Bowel_Small", 3: "Stomach"}
