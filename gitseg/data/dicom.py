"""DICOM MR series in (and, for the synthetic data, out): one volume with its patient geometry.

A series folder holds one file per slice, in any order and with any names. Slices are sorted by
their position along the slice normal (ImagePositionPatient projected on the cross product of
ImageOrientationPatient's row and column directions) and stored head first, as the training
data's slices run (docs/DATA.md): a series whose normal points to the head is reversed. Pixel
values go through RescaleSlope/RescaleIntercept where present. In-plane, pixels stay as stored:
the models learnt axial slices in the usual display (patient's right on the image's left,
anterior at the top), and `gitseg predict` refuses other orientations unless forced
(ensemble/predict/input_checks.py). Files that are not DICOM (a README.TXT beside an export) and a
DICOMDIR are skipped.

Geometry follows DICOM's patient coordinates (LPS, mm): voxel (column i, row j, slice k) of the
sorted volume is at `affine @ (i, j, k, 1)`, where `affine` holds the row direction times the
column spacing, the column direction times the row spacing, the step between sorted slices and
the first slice's ImagePositionPatient.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from gitseg.data.geometry import AXIAL, spacing_of
from gitseg.data.uwmgi import index_root, volume_from_rows

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR
# Tolerances: direction cosines compared to 1e-4 (scanners write 6 decimals); a gap between slices
# more than 10% off the series' typical spacing is a missing or extra slice.
ORIENTATION_TOLERANCE = 1e-4
SPACING_TOLERANCE = 0.10


class DicomSeriesError(ValueError):
    """A series folder that cannot be read as one volume; the message names the file and the problem."""


@dataclasses.dataclass
class Series:
    image: np.ndarray            # float32 (D, H, W), rescaled, head first
    affine: np.ndarray           # 4x4: (column, row, slice index, 1) -> patient LPS mm
    datasets: list               # pydicom Datasets in the order of `image` (pixel data dropped)
    files: list[Path]            # the same order

    skipped: list[str] = dataclasses.field(default_factory=list)  # files of the folder that are not DICOM

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(slice spacing, row spacing, column spacing) in mm, as the cache's entries hold them."""
        return spacing_of(self.affine)

    @property
    def uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def name(self) -> str:
        return f"series {self.uid}"


class NotDicom(Exception):
    """A file that is not a DICOM object: a series folder may hold a README or an index beside it."""


def _read(path: Path):
    import pydicom  # only the DICOM path needs it
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:  # no preamble: older files often lack it, so read it as a bare data set
        pass
    except (OSError, ValueError, EOFError) as exc:
        raise DicomSeriesError(f"{path}: cannot be read as DICOM ({exc})") from None
    try:
        ds = pydicom.dcmread(path, force=True)
        if "SOPClassUID" in ds or "Modality" in ds:
            return ds
    except Exception:  # whatever a non-DICOM file makes the parser raise
        pass
    raise NotDicom(path)


def _vector(ds, key: str, path: Path, size: int) -> np.ndarray:
    value = ds.get(key)
    if value is None or len(value) != size:
        raise DicomSeriesError(f"{path}: {key} is missing or malformed; the geometry of the slice is unknown")
    return np.asarray([float(v) for v in value])


def read_series(folder, files=None) -> Series:
    """Read every DICOM file of `folder` (or the given `files` of it) as one MR series; files that are not
    DICOM (a README, an index) and a DICOMDIR are skipped and listed in `Series.skipped`.
    DicomSeriesError names the file and the problem (not an MR image, several series, mixed or
    non-parallel orientations, a missing slice)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; --dicom takes the folder of one series")
    if files is None:
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    slices, skipped = [], []
    for path in map(Path, files):
        try:
            ds = _read(path)
        except NotDicom:
            skipped.append(path.name)
            continue
        meta = getattr(ds, "file_meta", None) or {}
        if MEDIA_STORAGE_DIRECTORY in (ds.get("SOPClassUID"), meta.get("MediaStorageSOPClassUID")):  # a DICOMDIR
            skipped.append(path.name)
            continue
        modality = ds.get("Modality", "")
        if "PixelData" not in ds:
            raise DicomSeriesError(f"{path}: a {modality or 'DICOM'} object without pixel data "
                                   f"(SOP class {ds.get('SOPClassUID', '?')}), not an image slice")
        if modality != "MR":
            raise DicomSeriesError(f"{path}: modality {modality or 'missing'}, not MR; gitseg's models read MR series")
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise DicomSeriesError(f"{path}: a multi-frame image ({ds.NumberOfFrames} frames); give a series of "
                                   f"single-frame slices")
        slices.append((path, ds))
    if not slices:
        others = f" (not DICOM: {', '.join(skipped)})" if skipped else ""
        raise DicomSeriesError(f"{folder} holds no DICOM image{others}; --dicom takes the folder of one series")
    series = {}
    for path, ds in slices:
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(path)
    if len(series) > 1:
        listing = "; ".join(f"{uid or '(no UID)'}: {len(p)} file(s), e.g. {p[0].name}" for uid, p in series.items())
        raise DicomSeriesError(f"{folder} holds {len(series)} series ({listing}); put each series in its own folder")

    first_path, first = slices[0]
    orientation = _vector(first, "ImageOrientationPatient", first_path, 6)
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    pixel = _vector(first, "PixelSpacing", first_path, 2)  # (row spacing, column spacing)
    shape = (int(first.Rows), int(first.Columns))
    positions = []
    for path, ds in slices:
        other = _vector(ds, "ImageOrientationPatient", path, 6)
        if np.abs(other - orientation).max() > ORIENTATION_TOLERANCE:
            raise DicomSeriesError(f"{path}: ImageOrientationPatient {list(other)} differs from {first_path.name}'s "
                                   f"{list(orientation)}: the slices are not parallel")
        spacing = _vector(ds, "PixelSpacing", path, 2)
        if (int(ds.Rows), int(ds.Columns)) != shape or np.abs(spacing - pixel).max() > 1e-4:
            raise DicomSeriesError(f"{path}: size {ds.Rows}x{ds.Columns} or pixel spacing differs from "
                                   f"{first_path.name}'s: not one volume")
        positions.append(float(_vector(ds, "ImagePositionPatient", path, 3) @ normal))
    order = np.argsort(positions, kind="stable")
    if normal[2] > 0:  # the normal points to the head (LPS +z): reverse, so that slices run head first
        order = order[::-1]
    along = np.asarray(positions)[order]
    step = 0.0
    if len(order) > 1:
        gaps = np.diff(along)
        names = [slices[i][0].name for i in order]
        same = np.flatnonzero(np.abs(gaps) < 1e-3)
        if len(same):
            k = int(same[0])
            raise DicomSeriesError(f"{folder / names[k + 1]}: the same position as {names[k]}: a duplicate slice")
        step = float(np.median(gaps))
        off = np.flatnonzero(np.abs(gaps - step) > SPACING_TOLERANCE * abs(step))
        if len(off):
            k = int(off[0])
            raise DicomSeriesError(f"{folder / names[k + 1]}: {abs(gaps[k]):.2f} mm from {names[k]} where the "
                                   f"series' slices are {abs(step):.2f} mm apart: a slice is missing (or the "
                                   f"spacing is uneven)")
    else:  # one slice: its thickness, in the direction the order runs
        thickness = float(first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0)
        step = -thickness if normal[2] > 0 else thickness
    image = np.empty((len(order), *shape), np.float32)
    datasets, paths = [], []
    for z, i in enumerate(order):
        path, ds = slices[i]
        pixels = ds.pixel_array.astype(np.float32)
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        image[z] = pixels * slope + intercept
        del ds.PixelData  # the geometry and references stay; the pixels are in `image`
        datasets.append(ds)
        paths.append(path)
    affine = np.eye(4)
    affine[:3, 0] = row_dir * pixel[1]
    affine[:3, 1] = col_dir * pixel[0]
    affine[:3, 2] = normal * step
    affine[:3, 3] = _vector(datasets[0], "ImagePositionPatient", paths[0], 3)
    return Series(image=image, affine=affine, datasets=datasets, files=paths, skipped=skipped)


# ---------------------------------------------------------------------------------------------
# Writing a volume as a DICOM MR series (the synthetic data, and the tests' inputs)


def write_series(folder, image: np.ndarray, spacing, case_day: str, seed: int = 0, orientation=AXIAL,
                 origin=(0.0, 0.0, 0.0), slope: float | None = None, intercept: float = 0.0) -> list[Path]:
    """Write uint16 `image` `(D, H, W)` (head first) as one MR series, a file per slice, into `folder`.

    `spacing` is (slice, row, column) mm; slice k lies `k * spacing[0]` mm from `origin` along the
    slice normal, toward the feet when the normal has a head-feet component (read_series's order).
    With `slope`, stored values are `(image - intercept) / slope` and RescaleSlope/RescaleIntercept
    carry the rest (a reader must apply them).
    """
    import pydicom  # only the DICOM path needs it
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    prefix = "1.2.826.0.1.3680043.10.1424."  # a root for synthetic data (any valid root would do)

    def uid(kind: str) -> str:
        return generate_uid(prefix, entropy_srcs=[case_day, str(seed), kind])

    orientation = np.asarray(orientation, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    step_dir = -normal if normal[2] > 0 else normal  # read_series's order: head first where there is a head
    stored = image if slope is None else np.round((image.astype(np.float64) - intercept) / slope)
    stored = stored.astype(np.uint16)
    paths = []
    for k, pixels in enumerate(stored):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        ds.file_meta.MediaStorageSOPInstanceUID = uid(f"image{k}")
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = MR_IMAGE_STORAGE, uid(f"image{k}")
        ds.Modality = "MR"
        ds.PatientName, ds.PatientID = f"gitseg^{case_day}", case_day.split("_")[0]
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = uid("study"), uid("series")
        ds.FrameOfReferenceUID = uid("frame")
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
        ds.ReferringPhysicianName = ""
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.SeriesDescription = f"gitseg synthetic {case_day}"
        ds.Manufacturer = "gitseg synth"
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "2D"
        ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength = 10.0, 500.0, 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.PositionReferenceIndicator = ""
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k * spacing[0] * step_dir]
        ds.SliceLocation = float(np.dot(ds.ImagePositionPatient, normal))
        ds.PixelSpacing = [float(spacing[1]), float(spacing[2])]
        ds.SliceThickness = float(spacing[0])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        if slope is not None:
            ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "US"
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        path = folder / f"IM{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


DICOM_FOLDER = "dicom"  # under a synthetic tree: dicom/<case_day>/, one series each


def write_dicom_tree(root, split: str = "test", seed: int = 0, progress=None) -> list[Path]:
    """Write every case-day of a UWMGI tree's `split` as a DICOM MR series under
    `root/dicom/<case_day>/` (`gitseg synth --dicom`); returns the series folders."""
    root = Path(root)
    slices, problems = index_root(root, split)
    if problems:
        raise DicomSeriesError(f"{root}/{split} has problems ({problems[0]}, ...); fix the tree first")
    days = list(dict.fromkeys(slices["case_day"]))
    folders = []
    for i, case_day in enumerate(days):
        volume = volume_from_rows(slices[slices["case_day"] == case_day])
        folder = root / DICOM_FOLDER / case_day
        if folder.exists():
            for old in folder.glob("*.dcm"):
                old.unlink()
        write_series(folder, volume.image, volume.spacing, case_day, seed=seed)
        folders.append(folder)
        if progress:
            progress(i + 1, len(days))
    return folders
