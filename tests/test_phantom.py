"""The realistic phantom (gitseg/data/phantom.py): its masks have the real data's statistics, its
small bowel is many small loops, and its case-days differ the way patients and days do."""

import numpy as np
import pytest
from scipy import ndimage

from gitseg.data.phantom import render_scan, sample_patient, scan_day
from gitseg.data.synth import ScanGeometry

GEO = ScanGeometry(64, 64, 4.5, 96)  # the real field of view (288 mm) at 64 px, 96 slices
REAL = {"empty": 0.569, "large_bowel": 0.366, "small_bowel": 0.291, "stomach": 0.224}  # docs/DATA.md


@pytest.fixture(scope="module")
def scans():
    """Two days of each of 8 patients: {(case, day): (image, masks)}."""
    out = {}
    for case in range(8):
        patient = sample_patient(np.random.default_rng([7, case]))
        for day in range(2):
            on_day = scan_day(patient, np.random.default_rng([7, case, day + 1]), day == 0)
            out[case, day] = render_scan(patient, on_day, GEO)
    return out


def test_slice_shares_are_the_real_datas_within_a_few_points(scans):
    present = np.array([masks.any(axis=(2, 3)) for _, masks in scans.values()])  # (scans, 3, D)
    found = {"empty": 1 - present.any(axis=1).mean(), "large_bowel": present[:, 0].mean(),
             "small_bowel": present[:, 1].mean(), "stomach": present[:, 2].mean()}
    for key, share in REAL.items():
        assert abs(found[key] - share) < 0.04, (key, found[key], share)


def test_small_bowel_is_many_small_sections_and_bowel_masks_overlap_at_times(scans):
    def sections(masks, c):
        return np.mean([ndimage.label(masks[c, z])[1] for z in range(GEO.slices) if masks[c, z].any()])

    small = np.mean([sections(m, 1) for _, m in scans.values()])
    stomach = np.mean([sections(m, 2) for _, m in scans.values()])
    assert small > 2.5 * stomach and stomach < 1.5, (small, stomach)
    # As in the real labels, a voxel is now and then both large and small bowel.
    assert sum((m[0] & m[1]).any() for _, m in scans.values()) >= 2


def test_days_of_one_case_differ_and_are_more_alike_than_two_cases(scans):
    def dice(a, b):
        return 2 * (a & b).sum() / max(1, a.sum() + b.sum())

    same = [dice(scans[c, 0][1], scans[c, 1][1]) for c in range(8)]
    other = [dice(scans[c, 0][1], scans[(c + 1) % 8, 0][1]) for c in range(8)]
    assert all(s < 0.99 for s in same)  # another day is another scan
    assert np.mean(same) > np.mean(other) + 0.1, (np.mean(same), np.mean(other))
    assert not np.array_equal(scans[0, 0][0], scans[0, 1][0])
    # The anatomy moves between days (shift and smooth displacement), not only its slice range:
    # the small bowel's in-plane centre moves by millimetres (about 11 here; 0.6 without the motion).
    def centre_mm(masks):
        _, rows, cols = np.nonzero(masks[1])
        return np.array([rows.mean(), cols.mean()]) * GEO.spacing

    moves = [np.linalg.norm(centre_mm(scans[c, 0][1]) - centre_mm(scans[c, 1][1])) for c in range(8)]
    assert np.mean(moves) > 3, moves


def test_intensity_scales_spread_as_the_real_case_days_do(scans):
    # docs/DATA.md: some case-days have a maximum of a few hundred, the median several thousand.
    tops = np.array([image.max() for image, _ in scans.values()])
    assert tops.max() > 5 * tops.min() and 1000 < np.median(tops) < 20000, sorted(tops)


def test_the_same_seed_gives_the_same_scan():
    patient = sample_patient(np.random.default_rng(3))
    day = scan_day(patient, np.random.default_rng(4), False)
    first, again = render_scan(patient, day, GEO), render_scan(patient, day, GEO)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
