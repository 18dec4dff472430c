"""The clinical path without a model: the DICOM series reader, and the SEG, RTSTRUCT and NIfTI
round trips on hand-made masks (tests/test_ensemble.py runs `gitseg predict --dicom` end to end)."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ensemble.predict.clinical import rtstruct_masks, seg_masks, write_rtstruct, write_seg
from gitseg.data.dicom import DicomSeriesError, read_series, write_series
from gitseg.data.geometry import LPS_TO_RAS
from gitseg.data.nifti import TG263, read_volume, write_volume

SPACING = (3.0, 1.5, 1.25)  # slice, row, column mm


def volume(depth=6, height=20, width=24, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4000, (depth, height, width), dtype=np.uint16)


def series_folder(tmp_path, name="series", **kwargs):
    image = kwargs.pop("image", volume())
    write_series(tmp_path / name, image, kwargs.pop("spacing", SPACING), kwargs.pop("case_day", "case1_day0"),
                 **kwargs)
    return tmp_path / name, image


def test_a_written_series_reads_back_with_its_geometry(tmp_path):
    folder, image = series_folder(tmp_path, origin=(-10.0, 20.0, 50.0))
    series = read_series(folder)
    assert np.array_equal(series.image, image.astype(np.float32))
    assert series.spacing == pytest.approx(SPACING)
    # Axial, head first: slice k lies k * 3 mm toward the feet (LPS -z) of the first.
    for k in (0, 5):
        assert series.affine @ [0, 0, k, 1] == pytest.approx([-10.0, 20.0, 50.0 - 3.0 * k, 1])
    assert series.affine @ [2, 3, 0, 1] == pytest.approx([-10.0 + 2 * 1.25, 20.0 + 3 * 1.5, 50.0, 1])


def test_shuffled_files_with_any_names_read_the_same(tmp_path):
    folder, image = series_folder(tmp_path)
    files = sorted(folder.iterdir())
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    names = [f"x{random.Random(0).random()}_{i}" for i in range(len(files))]
    for path, name in zip(random.Random(1).sample(files, len(files)), names):
        shutil.copy(path, shuffled / name)
    a, b = read_series(folder), read_series(shuffled)
    assert np.array_equal(a.image, b.image) and np.allclose(a.affine, b.affine)
    assert [str(d.SOPInstanceUID) for d in a.datasets] == [str(d.SOPInstanceUID) for d in b.datasets]


@pytest.mark.parametrize("orientation", [(1, 0, 0, 0, 1, 0), (-1, 0, 0, 0, 1, 0)])
def test_slices_run_head_first_whichever_way_the_normal_points(tmp_path, orientation):
    """The usual axial orientation's normal points to the head (LPS +z), a mirrored one's to the feet;
    either way the volume runs head first, as the training data does."""
    folder, image = series_folder(tmp_path, orientation=orientation, origin=(0.0, 0.0, 90.0))
    series = read_series(folder)
    assert np.array_equal(series.image, image.astype(np.float32))
    z = [float(d.ImagePositionPatient[2]) for d in series.datasets]
    assert z == sorted(z, reverse=True) and z[0] == 90.0
    assert series.affine[2, 2] == pytest.approx(-SPACING[0])


def test_oblique_slices_read_with_their_orientation(tmp_path):
    angle = np.radians(25)
    row = np.array([np.cos(angle), 0.0, np.sin(angle)])
    col = np.array([0.0, 1.0, 0.0])
    folder, image = series_folder(tmp_path, orientation=(*row, *col), origin=(5.0, -5.0, 10.0))
    series = read_series(folder)
    assert np.allclose(series.affine[:3, 0], row * SPACING[2]) and np.allclose(series.affine[:3, 1], col * SPACING[1])
    for k, ds in enumerate(series.datasets):
        assert series.affine @ [0, 0, k, 1] == pytest.approx([*map(float, ds.ImagePositionPatient), 1])


def test_rescale_slope_and_intercept_are_applied(tmp_path):
    image = (volume() // 2 * 2 + 100).astype(np.uint16)  # exact after (v - 100) / 2
    folder, _ = series_folder(tmp_path, image=image, slope=2.0, intercept=100.0)
    series = read_series(folder)
    assert int(series.datasets[0].RescaleSlope) == 2
    assert np.array_equal(series.image, image.astype(np.float32))


def test_a_missing_slice_is_named(tmp_path):
    folder, _ = series_folder(tmp_path)
    (folder / "IM0003.dcm").unlink()
    with pytest.raises(DicomSeriesError, match=r"IM0004.dcm: 6.00 mm from IM0002.dcm .* a slice is missing"):
        read_series(folder)


def test_two_series_in_one_folder_are_refused(tmp_path):
    folder, _ = series_folder(tmp_path)
    other, _ = series_folder(tmp_path, name="other", case_day="case2_day0")
    shutil.copy(other / "IM0001.dcm", folder / "zz_other.dcm")
    with pytest.raises(DicomSeriesError, match="holds 2 series .*put each series in its own folder"):
        read_series(folder)


def test_non_parallel_slices_are_refused(tmp_path):
    import pydicom

    folder, _ = series_folder(tmp_path)
    ds = pydicom.dcmread(folder / "IM0004.dcm")
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.9950, 0.0998]
    ds.save_as(folder / "IM0004.dcm")
    with pytest.raises(DicomSeriesError, match="IM0004.dcm: ImageOrientationPatient .* not parallel"):
        read_series(folder)


@pytest.mark.parametrize("intruder,message", [("CT_small.dcm", "modality CT, not MR"),
                                              ("rtstruct.dcm", "RTSTRUCT object without pixel data")])
def test_objects_that_are_not_mr_image_slices_are_named(tmp_path, intruder, message):
    from pydicom.data import get_testdata_file

    folder, _ = series_folder(tmp_path)
    shutil.copy(get_testdata_file(intruder), folder / "intruder.dcm")
    with pytest.raises(DicomSeriesError, match=f"intruder.dcm: .*{message}"):
        read_series(folder)


def test_files_that_are_not_dicom_and_a_dicomdir_are_skipped_and_listed(tmp_path):
    """Exports put a README.TXT, notes or a DICOMDIR beside the slices: the series reads as without them."""
    from pydicom.data import get_testdata_file

    folder, image = series_folder(tmp_path)
    (folder / "README.TXT").write_text("Exported by a PACS\n")
    (folder / "notes.dcm").write_bytes(b"\x00" * 200)
    shutil.copy(get_testdata_file("DICOMDIR"), folder / "DICOMDIR")
    series = read_series(folder)
    assert np.array_equal(series.image, image.astype(np.float32))
    assert sorted(series.skipped) == ["DICOMDIR", "README.TXT", "notes.dcm"]
    for path in folder.glob("IM*.dcm"):
        path.unlink()
    with pytest.raises(DicomSeriesError, match=r"holds no DICOM image \(not DICOM: DICOMDIR, README.TXT, notes.dcm\)"):
        read_series(folder)


@pytest.mark.parametrize("name", ["MR_small.dcm", "MR_small_RLE.dcm"])
def test_pydicoms_own_mr_files_read_as_foreign_input(tmp_path, name):
    """Files gitseg did not write: pydicom's MR test slice, plain and RLE-compressed."""
    import pydicom
    from pydicom.data import get_testdata_file

    shutil.copy(get_testdata_file(name), tmp_path / "slice")
    series = read_series(tmp_path)
    ds = pydicom.dcmread(get_testdata_file(name))
    assert series.image.shape == (1, 64, 64)
    assert np.array_equal(series.image[0], ds.pixel_array.astype(np.float32))
    assert series.affine[:3, 3] == pytest.approx([float(v) for v in ds.ImagePositionPatient])
    assert series.spacing[1:] == pytest.approx([float(v) for v in ds.PixelSpacing])


# ---------------------------------------------------------------------------------------------
# Round trips


def hand_made_masks(shape) -> np.ndarray:
    """Three classes on `(D, H, W)`: a ring with a hole, overlapping blobs, an empty slice, a one-pixel
    speck and a class that touches the image border."""
    d, h, w = shape
    yy, xx = np.mgrid[:h, :w]
    masks = np.zeros((3, d, h, w), bool)
    for z in range(1, d - 1):
        r = np.hypot(yy - h / 2, xx - w / 2)
        masks[0, z] = (r < 7 + z % 2) & (r > 3)          # a ring: outer contour and hole
        masks[1, z] = (np.abs(yy - 5) < 3) & (np.abs(xx - 6 - z) < 4)
    masks[1, 2, 15, 20] = True                           # a speck
    masks[2, 3, :6, :5] = True                           # on the border
    return masks


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clinical")
    angle = np.radians(10)
    folder, _ = series_folder(tmp, orientation=(np.cos(angle), np.sin(angle), 0, -np.sin(angle), np.cos(angle), 0),
                              origin=(-30.0, 12.0, 40.0))
    series = read_series(folder)
    masks = hand_made_masks(series.image.shape)
    write_seg(tmp / "seg.dcm", masks, series)
    contours = write_rtstruct(tmp / "rtstruct.dcm", masks, series)
    labels = np.argmax(np.concatenate([np.zeros((1, *masks.shape[1:]), bool), masks]), axis=0).astype(np.uint8)
    write_volume(tmp / "labels.nii.gz", labels, series.affine)
    return tmp, series, masks, labels, contours


def test_seg_reads_back_exactly(written):
    import highdicom as hd

    tmp, series, masks, _, _ = written
    assert np.array_equal(seg_masks(tmp / "seg.dcm", series), masks)
    seg = hd.seg.segread(tmp / "seg.dcm")
    assert [seg.get_segment_description(n).segment_label for n in (1, 2, 3)] == list(TG263)
    assert seg.SeriesInstanceUID != series.uid and seg.FrameOfReferenceUID == series.datasets[0].FrameOfReferenceUID


def test_rtstruct_rasterises_back_within_one_pixel_of_the_boundary(written):
    import pydicom
    from scipy import ndimage

    tmp, series, masks, _, contours = written
    back = rtstruct_masks(tmp / "rtstruct.dcm", series)
    boundary = np.zeros_like(masks)
    for c in range(3):
        for z in range(masks.shape[1]):
            m = masks[c, z]
            boundary[c, z] = ndimage.binary_dilation(m) & ~ndimage.binary_erosion(m)
    assert not (back ^ masks)[~boundary].any()  # every difference lies on the boundary band
    assert (back ^ masks).sum() <= 0.02 * masks.sum()  # and there are few
    ds = pydicom.dcmread(tmp / "rtstruct.dcm")
    assert [r.ROIName for r in ds.StructureSetROISequence] == list(TG263)
    assert contours == sum(len(r.get("ContourSequence", [])) for r in ds.ROIContourSequence) > 0
    ref = ds.ReferencedFrameOfReferenceSequence[0]
    assert ref.FrameOfReferenceUID == series.datasets[0].FrameOfReferenceUID
    referenced = ref.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == series.uid and len(referenced.ContourImageSequence) == len(series.datasets)
    assert ds.StudyInstanceUID == series.datasets[0].StudyInstanceUID


def test_nifti_voxel_corners_are_where_dicom_puts_them(written):
    """World (RAS) coordinates of the volume's 8 corners from the NIfTI file equal those from the
    DICOM attributes themselves (IPP of the first and last slice, IOP, PixelSpacing), LPS → RAS."""
    import nibabel as nib

    tmp, series, _, labels, _ = written
    image = nib.load(tmp / "labels.nii.gz")
    assert np.array_equal(np.asarray(image.dataobj).transpose(2, 1, 0), labels)
    first, last = series.datasets[0], series.datasets[-1]
    iop = np.asarray(first.ImageOrientationPatient, float)
    row_mm, col_mm = (float(v) for v in first.PixelSpacing)
    step = (np.asarray(last.ImagePositionPatient, float) - np.asarray(first.ImagePositionPatient, float)) / (
        len(series.datasets) - 1)
    d, h, w = labels.shape
    for i in (-0.5, w - 0.5):
        for j in (-0.5, h - 0.5):
            for k in (-0.5, d - 0.5):
                dicom = (np.asarray(first.ImagePositionPatient, float) + i * col_mm * iop[:3] + j * row_mm * iop[3:]
                         + k * step)
                assert image.affine @ [i, j, k, 1] == pytest.approx([*(LPS_TO_RAS[:3, :3] @ dicom), 1], abs=1e-6)
    again, affine = read_volume(tmp / "labels.nii.gz")
    assert np.array_equal(again, labels.astype(np.float32)) and np.allclose(affine, series.affine)


# The test extra installs dicom3tools into the venv (CI does not put .venv/bin on PATH).
DCIODVFY = shutil.which("dciodvfy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def dciodvfy_errors(path) -> list[str]:
    done = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.skipif(DCIODVFY is None, reason="dicom3tools (dciodvfy) is not installed: `pip install -e '.[test]'`")
@pytest.mark.parametrize("name", ["seg.dcm", "rtstruct.dcm"])
def test_dciodvfy_finds_no_errors(written, name):
    tmp = written[0]
    errors = dciodvfy_errors(tmp / name)
    assert not errors, "\n".join(errors)
