"""Clinical outputs of one series: DICOM-SEG, an RT Structure Set and NIfTI labels, side by side.

    gitseg predict --ensemble DIR --dicom SERIES_DIR --out OUT   ->  OUT/seg.dcm, OUT/rtstruct.dcm,
                                                                     OUT/labels.nii.gz, OUT/labels.ctbl,
                                                                     OUT/labels.itksnap.txt, OUT/timings.json
    gitseg predict --ensemble DIR --nifti-in FILE --out OUT      ->  the same without SEG and RTSTRUCT

The scan is checked against the ensemble's training scans first (ensemble/predict/input_checks.py), and
every output says it is for research use only: the SEG's ContentDescription and ImageComments,
the RTSTRUCT's StructureSetDescription and the NIfTI's descrip, with any warnings that `--force`
let through.

- `seg.dcm`: a binary DICOM Segmentation written with highdicom, one segment per organ (SNOMED CT
  codes), each frame referencing its source slice.
- `rtstruct.dcm`: an RT Structure Set, one ROI per organ with the TG-263 names, closed planar
  contours per slice in patient coordinates, referencing the series, its study and its frame of
  reference. Written with pydicom; the contours come from OpenCV's `findContours`, which OpenCV
  (already a dependency) keeps, rather than from a dedicated RTSTRUCT library: rt-utils, the
  common one, pins old pydicom and numpy versions and has had no release since 2023. A slice's
  contours are the outlines of its regions and of their holes (and of islands in holes); a reader
  fills them with the even-odd rule, as planning systems treat nested contours (`rtstruct_masks`).
- `labels.nii.gz`: the labels 1..3 (where organs overlap, the more probable one), with the affine
  of the DICOM geometry converted to NIfTI's RAS (gitseg/data/nifti.py, the same writer as the
  Kaggle path's): any viewer overlays it on the series; the label tables name the organs.
- `review.txt` (an ensemble of two or more networks): where its members disagree, the slices to
  check first with their table positions (ensemble/predict/review.py); `<name>.review.txt` beside
  each volume's labels for NIfTI input.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ensemble.deploy.runtime import load_engine
from ensemble.predict.input_checks import InputRefused, empty_organs, output_description, refuse_or_warn, scan_problems
from ensemble.predict.review import case_day_review, review_text, votes_for
from gitseg import RESEARCH_USE, __version__
from gitseg.data.dicom import Series, read_series
from gitseg.data.geometry import axis_codes, nifti_reorientation, spacing_of
from gitseg.data.nifti import COLOURS, SLICER_TABLE, TG263, label_volume, read_volume, write_label_table, write_volume
from gitseg.data.rtstruct import roi_names, structure_masks
from gitseg.data.uwmgi import CLASSES
from gitseg.files import atomic_path, write_text_atomic
from gitseg.progress import say

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"


def _codes():
    from pydicom.sr.codedict import codes  # heavy: only the DICOM outputs need pydicom

    return (codes.SCT.LargeIntestine, codes.SCT.SmallIntestine, codes.SCT.Stomach)


def _uid(series: Series, kind: str) -> str:
    """A UID that is the same for the same series and output (re-running replaces, not duplicates)."""
    from pydicom.uid import generate_uid  # heavy: only the DICOM outputs need pydicom

    return generate_uid(entropy_srcs=[series.uid, kind, __version__])


# ---------------------------------------------------------------------------------------------
# DICOM-SEG


def write_seg(path, masks: np.ndarray, series: Series, warnings=()) -> None:
    """Binary DICOM-SEG of bool `masks` `(3, D, H, W)` (series order), one segment per class. Its
    ContentDescription says it is for research use (and whether input checks were forced), its
    ImageComments hold the notice and every warning."""
    import highdicom as hd  # heavy: only SEG output needs highdicom (it loads pydicom and pillow)
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(name="gitseg", version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    segments = [hd.seg.SegmentDescription(
        segment_number=c + 1, segment_label=TG263[c], segmented_property_category=codes.cid7150.AnatomicalStructure,
        segmented_property_type=code, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm) for c, code in enumerate(_codes())]
    seg = hd.seg.Segmentation(
        source_images=series.datasets, pixel_array=np.moveaxis(masks, 0, -1).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=segments,
        series_instance_uid=_uid(series, "seg-series"), series_number=901, sop_instance_uid=_uid(series, "seg"),
        instance_number=1, manufacturer="gitseg", manufacturer_model_name="gitseg ensemble",
        software_versions=__version__, device_serial_number="none", series_description="gitseg organs at risk",
        content_description=output_description(bool(warnings)))
    seg.ImageComments = " ".join([RESEARCH_USE, *warnings])[:10240]  # LT: at most 10240 characters
    with atomic_path(path, suffix=".dcm") as tmp:
        seg.save_as(tmp)


def seg_masks(path, series: Series) -> np.ndarray:
    """bool `(3, D, H, W)` of a SEG file, in `series`' slice order (the round trip's reader)."""
    import highdicom as hd  # heavy: only SEG reading needs highdicom

    seg = hd.seg.segread(path)
    uids = [str(ds.SOPInstanceUID) for ds in series.datasets]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1, 2, 3],
                                               assert_missing_frames_are_empty=True)
    return np.moveaxis(pixels, -1, 0).astype(bool)


# ---------------------------------------------------------------------------------------------
# RT Structure Set


def slice_contours(mask: np.ndarray) -> list[np.ndarray]:
    """The contours of a 2D bool mask as `(N, 2)` pixel (column, row) points, filled with the even-odd
    rule to give the mask back: the outline of each region with its holes filled, then the outline of
    each hole's own pixels, then of islands inside holes, and so on. Each polygon runs through the
    centres of the pixels it encloses, so that filling it (boundary included) gives those pixels."""
    import cv2  # heavy: OpenCV loads only where contours are drawn
    from scipy import ndimage

    contours = []
    while mask.any():
        filled = ndimage.binary_fill_holes(mask)
        found, _ = cv2.findContours(filled.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        contours += [c[:, 0, :].astype(np.float64) for c in found]
        mask = filled & ~mask  # the holes: their outlines come next
    return contours


def to_patient(points: np.ndarray, z: int, affine: np.ndarray) -> np.ndarray:
    """Pixel (column, row) points of slice z → patient LPS mm `(N, 3)`."""
    homogeneous = np.column_stack([points, np.full(len(points), z), np.ones(len(points))])
    return (affine @ homogeneous.T).T[:, :3]


def write_rtstruct(path, masks: np.ndarray, series: Series, warnings=()) -> int:
    """RT Structure Set of bool `masks` `(3, D, H, W)`; returns the number of contours written. Its
    StructureSetDescription holds the research-use notice and every warning `--force` let through."""
    import pydicom  # heavy: only the DICOM outputs need pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian

    src = series.datasets[0]
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = _uid(series, "rtstruct")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = RT_STRUCTURE_SET_STORAGE, ds.file_meta.MediaStorageSOPInstanceUID
    now = time.localtime()
    ds.InstanceCreationDate, ds.InstanceCreationTime = time.strftime("%Y%m%d", now), time.strftime("%H%M%S", now)
    # Patient and study: the source series', so that a planning system files it with the scan.
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName"):
        setattr(ds, key, src.get(key, ""))
    ds.FrameOfReferenceUID = src.FrameOfReferenceUID  # the Frame of Reference module: the series' own
    ds.PositionReferenceIndicator = src.get("PositionReferenceIndicator", "")
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID, ds.SeriesNumber = _uid(series, "rtstruct-series"), 902
    ds.SeriesDescription = "gitseg organs at risk"
    ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = "gitseg", "gitseg ensemble", __version__
    ds.OperatorsName = ""
    ds.StructureSetLabel = "gitseg"
    ds.StructureSetDescription = " ".join([RESEARCH_USE, *warnings])[:1024]  # ST: at most 1024 characters
    ds.StructureSetDate, ds.StructureSetTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.ApprovalStatus = "UNAPPROVED"  # an automatic segmentation: a clinician reviews it

    def image_ref(z: int):
        ref = pydicom.Dataset()
        ref.ReferencedSOPClassUID = series.datasets[z].SOPClassUID
        ref.ReferencedSOPInstanceUID = series.datasets[z].SOPInstanceUID
        return ref

    rt_series = pydicom.Dataset()
    rt_series.SeriesInstanceUID = src.SeriesInstanceUID
    rt_series.ContourImageSequence = Sequence([image_ref(z) for z in range(len(series.datasets))])
    rt_study = pydicom.Dataset()
    rt_study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (as the standard asks)
    rt_study.ReferencedSOPInstanceUID = src.StudyInstanceUID
    rt_study.RTReferencedSeriesSequence = Sequence([rt_series])
    frame = pydicom.Dataset()
    frame.FrameOfReferenceUID = src.FrameOfReferenceUID
    frame.RTReferencedStudySequence = Sequence([rt_study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame])

    rois, contours, observations = [], [], []
    written = 0
    for c, name in enumerate(TG263):
        roi = pydicom.Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID, roi.ROIName = c + 1, src.FrameOfReferenceUID, name
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        rois.append(roi)
        items = []
        for z in range(masks.shape[1]):
            for points in slice_contours(masks[c, z]):
                item = pydicom.Dataset()
                item.ContourImageSequence = Sequence([image_ref(z)])
                item.ContourGeometricType = "CLOSED_PLANAR"
                item.NumberOfContourPoints = len(points)
                item.ContourData = [f"{v:.4f}" for v in to_patient(points, z, series.affine).ravel()]
                items.append(item)
        written += len(items)
        contour = pydicom.Dataset()
        contour.ROIDisplayColor = list(COLOURS[c])
        contour.ReferencedROINumber = c + 1
        if items:
            contour.ContourSequence = Sequence(items)
        contours.append(contour)
        observation = pydicom.Dataset()
        observation.ObservationNumber, observation.ReferencedROINumber = c + 1, c + 1
        observation.RTROIInterpretedType, observation.ROIInterpreter = "ORGAN", ""
        observations.append(observation)
    ds.StructureSetROISequence = Sequence(rois)
    ds.ROIContourSequence = Sequence(contours)
    ds.RTROIObservationsSequence = Sequence(observations)
    with atomic_path(path, suffix=".dcm") as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return written


def rtstruct_masks(path, series: Series) -> np.ndarray:
    """bool `(3, D, H, W)` rasterised from an RT Structure Set gitseg wrote on `series`' grid (the reader
    that `gitseg prepare` uses for contoured DICOM cases, gitseg/data/rtstruct.py)."""
    return structure_masks(path, series, roi_names({}), allow_empty=True)


# ---------------------------------------------------------------------------------------------
# The command


def predict_series(ensemble_dir, out, dicom=None, nifti_in=None, device=None, force: bool = False,
                   log=say, model=None, labels_name: str = "labels.nii.gz",
                   timings_name: str | None = "timings.json", runtime: str = "auto") -> dict:
    """Predict one series (`dicom` folder or `nifti_in` file) into `out`; returns the timings in
    seconds (read, models, inference, write), the files written, the input checks' warnings (with
    `force`) and the empty organs, also saved as OUT/timings.json.

    A scan unlike the ensemble's training scans raises InputRefused before anything is written,
    unless `force` (ensemble/predict/input_checks.py)."""
    loaded = model is not None
    if not loaded:
        log(f"predict: {RESEARCH_USE}")
        model = load_engine(ensemble_dir, device, runtime)  # checked before anything is read
    training = model.manifest.training_data
    out = Path(out)
    start = time.perf_counter()
    reorient = None
    if dicom is not None:
        series = read_series(dicom)
        image, affine = series.image, series.affine
        name = series.name
        source = f"{len(series.datasets)} slices of {name}"
        if series.skipped:
            log(f"predict: skipped {len(series.skipped)} file(s) of {dicom} that are not DICOM images: "
                f"{', '.join(series.skipped)}")
    else:
        image, affine = read_volume(nifti_in)
        series, name = None, str(nifti_in)
        source = f"{nifti_in} ({image.shape[0]} slices)"
        # NIfTI volumes are stored in any axis order: brought to the axial display by their affine (as
        # prepare does for NIfTI training data), and the labels go back to the file's own grid.
        try:
            reorient = nifti_reorientation(affine, image.shape)
            image, affine = reorient.forward(image), reorient.affine
        except ValueError:  # oblique: the input checks refuse it, or --force predicts it as it is
            reorient = None
    read_s = time.perf_counter() - start
    spacing = spacing_of(affine)
    warnings = refuse_or_warn(scan_problems(image.shape, spacing, model.members, training, affine), name, force, log)

    start = time.perf_counter()
    if not loaded:
        log(f"predict: loading {len(model.members)} network(s) of {ensemble_dir} ...")
        model.load_networks()
    models_s = time.perf_counter() - start
    start = time.perf_counter()
    votes = votes_for(model, image.shape)
    probs, masks = model.predict_scan(image, votes=votes)
    infer_s = time.perf_counter() - start

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    files = {"labels": out / labels_name}
    labels = label_volume(probs, masks)
    if series is None and reorient is not None:
        labels, label_affine = reorient.backward(labels), reorient.source_affine
    else:
        label_affine = affine
    write_volume(files["labels"], labels, label_affine, output_description(bool(warnings)))
    files["label_tables"] = write_label_table(out)
    contours = None
    if series is not None:
        files["seg"], files["rtstruct"] = out / "seg.dcm", out / "rtstruct.dcm"
        write_seg(files["seg"], masks, series, warnings)
        contours = write_rtstruct(files["rtstruct"], masks, series, warnings)
    review = None
    if votes is not None:
        review = case_day_review(votes.counts, votes.members, spacing)
        files["review"] = out / labels_name.replace(".nii.gz", ".review.txt") if series is None else out / "review.txt"
        # The table position of each slice along the scan's axis, as the planning system shows it.
        positions = [float((affine @ [0, 0, z, 1])[2]) for z in range(image.shape[0])] if series is not None else None
        write_text_atomic(files["review"], review_text(name, review, positions))
    write_s = time.perf_counter() - start
    empty = empty_organs(masks, spacing, training)
    for line in empty:
        log(f"predict: {line}")
    timings = {"read_s": read_s, "models_s": models_s, "inference_s": infer_s, "write_s": write_s,
               "slices": int(image.shape[0]), "size": list(image.shape[1:]), "spacing_mm": list(spacing),
               "axes": "".join(axis_codes(affine)), "device": str(model.device), "contours": contours,
               "voxels": {cls: int(masks[c].sum()) for c, cls in enumerate(CLASSES)},
               "warnings": warnings, "empty_organs": empty, "notice": RESEARCH_USE,
               "review": None if review is None else {k: review[k] for k in ("disagreement", "agreement", "members")},
               "files": {k: [str(p) for p in v] if isinstance(v, list) else str(v) for k, v in files.items()}}
    if timings_name:
        write_text_atomic(out / timings_name, json.dumps(timings, indent=1))
    log(f"predict: {source}: read {read_s:.1f} s, networks {models_s:.1f} s, inference {infer_s:.1f} s, "
        f"writing {write_s:.1f} s; wrote {', '.join(p.name for p in files.values() if isinstance(p, Path))} "
        f"(label names in {SLICER_TABLE}) to {out}")
    return timings


def predict_nifti_folder(ensemble_dir, folder, out, device=None, force: bool = False, log=say,
                         runtime: str = "auto") -> dict:
    """Predict every NIfTI volume of `folder` (an nnU-Net imagesTs/, say) into OUT/<name>.nii.gz on
    the volume's own grid, as nnU-Net names its predictions (`<CASE>_0000.nii.gz` gives `<CASE>.nii.gz`);
    OUT/predict.json holds each volume's record. A volume the input checks refuse is listed under
    `failed` and the others go on."""
    folder, out = Path(folder), Path(out)
    files = sorted(p for p in folder.iterdir() if p.name.endswith((".nii.gz", ".nii")) and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"{folder} holds no NIfTI volume (.nii.gz, .nii)")
    log(f"predict: {RESEARCH_USE}")
    model = load_engine(ensemble_dir, device, runtime)
    log(f"predict: loading {len(model.members)} network(s) of {ensemble_dir} ...")
    model.load_networks()
    out.mkdir(parents=True, exist_ok=True)
    records, failed = {}, {}
    for path in files:
        stem = path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.stem
        name = stem[: -len("_0000")] if stem.endswith("_0000") else stem
        try:
            records[name] = predict_series(ensemble_dir, out, nifti_in=path, force=force, log=log, model=model,
                                           labels_name=f"{name}.nii.gz", timings_name=None)
        except (InputRefused, ValueError) as exc:
            failed[name] = str(exc)
            log(f"predict: {path}: {exc}")
    write_text_atomic(out / "predict.json", json.dumps({"volumes": records, "failed": failed}, indent=1))
    return {"written": sorted(records), "failed": failed}
