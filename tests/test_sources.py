"""Your own data: nnU-Net NIfTI data sets and contoured DICOM cases in (`gitseg prepare`), the nnU-Net
layout out (`gitseg export --to nnunet`), and the round trips between them and the Kaggle tree."""

import itertools
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from gitseg.data.cache import Cache, prepare
from gitseg.data.dicom import read_series, write_series
from gitseg.data.export import export_nnunet
from gitseg.data.geometry import Reorientation, axial_affine
from gitseg.data.nifti import write_volume
from gitseg.data.uwmgi import CLASSES, DataFormatError, load_volume

QUIET = dict(log=lambda *_: None)


def stored_as(standard: np.ndarray, affine: np.ndarray, perm, flips):
    """`standard` (D, H, W, standard display, LPS `affine`) stored with its array axes flipped by
    `flips` then permuted by `perm`, and the LPS affine that stored array has (worked out from its
    corners, independently of geometry.Reorientation)."""
    array = np.flip(standard, [a for a in range(3) if flips[a]]) if any(flips) else standard
    array = np.transpose(array, perm)
    source, target = [], []
    for p in itertools.product(*[[0, n - 1] for n in array.shape]):
        q = [0, 0, 0]
        for new, old in enumerate(perm):
            q[old] = p[new]
        q = [standard.shape[a] - 1 - q[a] if flips[a] else q[a] for a in range(3)]
        source.append([p[2], p[1], p[0], 1])
        target.append([q[2], q[1], q[0], 1])
    to_standard = np.linalg.lstsq(np.array(source, float), np.array(target, float), rcond=None)[0].T
    return np.ascontiguousarray(array), affine @ to_standard


def test_every_axis_order_comes_to_the_axial_display_and_back():
    rng = np.random.default_rng(0)
    standard = rng.random((5, 7, 9))
    affine = axial_affine((3.0, 1.5, 1.25))
    affine[:3, 3] = (10.0, -20.0, 30.0)
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product([False, True], repeat=3):
            array, source_affine = stored_as(standard, affine, perm, flips)
            r = Reorientation(source_affine, array.shape)
            assert np.array_equal(r.forward(array), standard) and np.allclose(r.affine, affine), (perm, flips)
            assert np.array_equal(r.backward(standard), array)
            assert np.array_equal(r.forward(np.stack([array, array]))[1], standard)  # (C, D, H, W) too


def entries_equal(a: Cache, b: Cache, names: dict[str, str] | None = None):
    """Each case-day of `a` has the same network input and original-size masks in `b` (under the name
    `names` gives it, by default its own)."""
    names = names or {cd: cd for cd in a.entries}
    for cd, other in names.items():
        assert np.array_equal(np.asarray(a.image(cd)), np.asarray(b.image(other))), cd
        assert np.array_equal(a.original_masks(cd), b.original_masks(other)), cd
        assert b.entries[other]["spacing"] == pytest.approx(a.entries[cd]["spacing"], rel=1e-6)


@pytest.fixture(scope="module")
def exports(cache_dir, tmp_path_factory):
    """The tiny Kaggle tree's cache (48 px, 2 folds, holdout 0.2, seed 0) exported both ways:
    {overlap: (folder, export.json's record)}. Read-only."""
    tmp = tmp_path_factory.mktemp("exports")
    return {overlap: (tmp / overlap, export_nnunet(cache_dir, tmp / overlap, overlap=overlap, **QUIET))
            for overlap in ("regions", "priority")}


def test_kaggle_tree_to_cache_to_nnunet_to_cache_is_the_same_data(cache_dir, exports, tmp_path):
    first = Cache(cache_dir).manifest
    nn, record = exports["regions"]
    spec = json.loads((nn / "dataset.json").read_text())
    assert spec["labels"]["large_bowel"] == [1, 3, 5, 7] and spec["regions_class_order"] == [1, 2, 4]
    assert spec["numTraining"] == len(list((nn / "imagesTr").iterdir())) == record["training_case_days"]
    entries = {e["case_day"]: e for e in first["entries"]}
    assert {p.name[: -len("_0000.nii.gz")] for p in (nn / "imagesTs").iterdir()} == {
        cd for cd, e in entries.items() if e["holdout"]}
    # nnU-Net trains on gitseg's folds: fold f validates on exactly the cache's fold f.
    splits = json.loads((nn / "splits_final.json").read_text())
    assert [sorted(s["val"]) for s in splits] == [
        sorted(cd for cd, e in entries.items() if e["fold"] == f and not e["holdout"]) for f in range(2)]
    assert all(not set(s["train"]) & set(s["val"]) for s in splits)
    # Regions keep every voxel of every organ, overlaps included (the phantom has some).
    assert record["overlapping_voxels"] > 0 and set(record["lost_voxels"].values()) == {0}

    second = prepare(nn, tmp_path / "c2", size=48, folds=2, holdout=0.2, seed=0, **QUIET)
    a, b = Cache(cache_dir), Cache(tmp_path / "c2")
    assert sorted(a.entries) == sorted(b.entries)
    entries_equal(a, b)
    assert [(e["case_day"], e["fold"], e["holdout"]) for e in first["entries"]] == [
        (e["case_day"], e["fold"], e["holdout"]) for e in second["entries"]]
    lines = []
    prepare(nn, tmp_path / "c2", size=48, folds=2, holdout=0.2, seed=0, log=lines.append)
    assert "0 to build" in lines[0]  # the NIfTI files are the entries' keys: unchanged, nothing rebuilt

    # One label per voxel loses, of each organ, its voxels that a later organ also holds.
    nn1, record = exports["priority"]
    lost = np.zeros(3, int)
    for cd in a.entries:
        m = a.original_masks(cd)
        lost += [(m[0] & (m[1] | m[2])).sum(), (m[1] & m[2]).sum(), 0]
    assert list(record["lost_voxels"].values()) == lost.tolist() and lost.sum() > 0
    assert json.loads((nn1 / "dataset.json").read_text())["labels"]["stomach"] == 3
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_nnunet(cache_dir, nn1, **QUIET)


def another_tools_data_set(synth_root, root, case_days, label_names=("colon", "ileum", "stomach"),
                           ending=".nii.gz"):
    """An nnU-Net data set as another tool writes one: its own case names (patient and visit), its own
    label names and values (2 large bowel, 1 small bowel, 3 stomach, 4 where the bowels overlap, as
    regions), and volumes stored in other axis orders. Returns {identifier: (case_day, volume, the masks
    its label map holds)}."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    labels = {"background": 0, label_names[0]: [2, 4], label_names[1]: [1, 4], label_names[2]: 3}
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2"}, "labels": labels,
                                                   "regions_class_order": [2, 1, 3, 4], "numTraining": len(case_days),
                                                   "file_ending": ending}))
    orders = [((0, 1, 2), (False, False, False)), ((2, 1, 0), (False, True, False)), ((0, 2, 1), (True, False, True))]
    made = {}
    for i, cd in enumerate(case_days):
        v = load_volume(synth_root, cd, split="train")
        value = np.zeros(v.image.shape, np.uint8)
        value[v.masks[1]] = 1
        value[v.masks[0]] = 2
        value[v.masks[0] & v.masks[1]] = 4
        value[v.masks[2]] = 3
        perm, flips = orders[i % len(orders)]
        affine = axial_affine(v.spacing)
        image, stored_affine = stored_as(v.image, affine, perm, flips)
        labels_stored, _ = stored_as(value, affine, perm, flips)
        ident = f"pat{cd.split('_')[0][4:]}_visit{i}"
        write_volume(root / "imagesTr" / f"{ident}_0000{ending}", image, stored_affine)
        write_volume(root / "labelsTr" / f"{ident}{ending}", labels_stored, stored_affine)
        # what the label map holds (where the stomach overlaps a bowel, this map keeps the stomach)
        expected = np.stack([np.isin(value, (2, 4)), np.isin(value, (1, 4)), value == 3])
        made[ident] = (cd, v, expected)
    return made


def test_an_nnunet_data_set_of_another_tool_reads_with_its_labels_cases_and_orientations(synth_root, tmp_path):
    days = sorted(p.name for p in (synth_root / "train").glob("case*/case*_day*"))[:4]  # two patients' days
    root = tmp_path / "Dataset777_Other"
    made = another_tools_data_set(synth_root, root, days)

    # "ileum" is no organ name gitseg knows: it says which option maps it, and writes nothing.
    with pytest.raises(DataFormatError, match="--labels small_bowel="):
        prepare(root, tmp_path / "cache", size=32, folds=2, holdout=0, **QUIET)
    assert not (tmp_path / "cache" / "manifest.json").exists()

    manifest = prepare(root, tmp_path / "cache", size=32, folds=2, holdout=0, labels="small_bowel=ileum",
                       case_pattern=r"(?P<case>pat\d+)_visit(?P<day>\d+)", **QUIET)
    cache = Cache(tmp_path / "cache")
    by_ident = {e["origin"]["id"]: e for e in manifest["entries"]}
    assert set(by_ident) == set(made)
    for ident, (cd, volume, expected) in made.items():
        e = by_ident[ident]
        # Volumes stored in any axis order come out in the axial display, the regions (4: both bowels)
        # as overlapping masks.
        assert np.array_equal(cache.original_masks(e["case_day"]), expected), ident
        assert (expected[0] & expected[1]).any()
        assert (e["height"], e["width"], e["slices"]) == volume.image.shape[1:] + volume.image.shape[:1]
        assert np.allclose(e["affine"], axial_affine(volume.spacing), atol=1e-4)  # NIfTI holds float32
    # Days of one patient are one case (folds keep them together); the pattern's day is the day.
    patients = {ident.split("_")[0] for ident in made}
    assert len({e["case"] for e in manifest["entries"]}) == len(patients)

    # A label value in no organ's mapping, and a label map on another grid, name the file.
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    spec = json.loads((bad / "dataset.json").read_text())
    spec["labels"] = {"background": 0, "colon": 2, "ileum": 1, "stomach": 3}
    (bad / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises(DataFormatError, match=r"label value\(s\) \[4\]"):
        prepare(bad, tmp_path / "c-bad", size=32, folds=2, holdout=0, labels="small_bowel=ileum", **QUIET)
    first = sorted((root / "labelsTr").iterdir())[0]
    write_volume(bad / "labelsTr" / first.name, np.zeros((3, 4, 5), np.uint8), np.eye(4))
    with pytest.raises(DataFormatError, match=first.name):
        prepare(bad, tmp_path / "c-bad", size=32, folds=2, holdout=0, labels="small_bowel=ileum", **QUIET)
    assert not list((tmp_path / "c-bad" / "volumes").glob("*.json"))


def dicom_cases(synth_root, root, case_days, writer="gitseg"):
    """Each case-day as an MR series with an RT Structure Set under root/<patient>/<case_day>/."""
    from ensemble.predict.clinical import write_rtstruct

    volumes = {}
    for cd in case_days:
        v = load_volume(synth_root, cd, split="train")
        folder = root / cd.split("_")[0] / cd
        write_series(folder / "MR", v.image, v.spacing, cd)
        series = read_series(folder / "MR")
        if writer == "gitseg":
            write_rtstruct(folder / "RS.dcm", v.masks, series)
        else:
            rt_structure_set_of_rt_utils(folder, v.masks)
        volumes[cd] = v
    return volumes


def rt_structure_set_of_rt_utils(folder, masks):
    """An RTSTRUCT written by rt-utils (another library) from bool `(3, D, H, W)` masks (head first)."""
    from rt_utils import RTStructBuilder

    rt = RTStructBuilder.create_new(dicom_series_path=str(folder / "MR"))
    # rt-utils orders slices by position along the normal, feet first: the reverse of gitseg's.
    for c, name in enumerate(("Bowel_Large", "Bowel_Small", "Stomach")):
        rt.add_roi(mask=np.transpose(masks[c][::-1], (1, 2, 0)), name=name)
    rt.save(str(folder / "RS.dcm"))


def case_day_of(entry) -> str:
    return entry["origin"]["files"][0].split("/")[1]


def test_contoured_dicom_cases_train_as_the_tree_does(synth_root, tmp_path):
    chosen = sorted(p.name for p in (synth_root / "train").glob("case*/case*_day*"))[:4]  # two patients' days
    volumes = dicom_cases(synth_root, tmp_path / "patients", chosen)
    manifest = prepare(tmp_path / "patients", tmp_path / "cache", size=48, folds=2, holdout=0, **QUIET)
    cache = Cache(tmp_path / "cache")
    assert len(manifest["entries"]) == len(chosen)
    for e in manifest["entries"]:
        # gitseg's own RT Structure Set reads back exactly (its contours run through pixel centres).
        assert np.array_equal(cache.original_masks(e["case_day"]), volumes[case_day_of(e)].masks)
        assert e["origin"]["patient"] == case_day_of(e).split("_")[0]
    assert len({e["case"] for e in manifest["entries"]}) == len({d.split("_")[0] for d in chosen})

    # One written by rt-utils: the same masks up to the rasterisation of boundary pixels.
    pytest.importorskip("rt_utils")
    dicom_cases(synth_root, tmp_path / "foreign", chosen[::2], writer="rt-utils")  # one day of each patient
    manifest = prepare(tmp_path / "foreign", tmp_path / "cache2", size=48, folds=2, holdout=0, **QUIET)
    cache = Cache(tmp_path / "cache2")
    for e in manifest["entries"]:
        truth, read = volumes[case_day_of(e)].masks, cache.original_masks(e["case_day"])
        for c in range(3):
            dice = 2 * (truth[c] & read[c]).sum() / max(truth[c].sum() + read[c].sum(), 1)
            assert dice > 0.95, (e["case_day"], CLASSES[c], dice)


def test_dicom_problems_name_the_file_and_skip_bad_records_them(synth_root, tmp_path):
    import pydicom

    days = sorted(p.name for p in (synth_root / "train").glob("case*/case*_day*"))[:3]
    root = tmp_path / "patients"
    dicom_cases(synth_root, root, days)
    lonely = root / "case999" / "case999_day1" / "MR"
    write_series(lonely, load_volume(synth_root, days[0], split="train").image[:5], (3.0, 1.5, 1.5), "case999_day1")
    with pytest.raises(DataFormatError, match="has no RT Structure Set"):
        prepare(root, tmp_path / "cache", size=32, folds=2, holdout=0, **QUIET)
    assert not (tmp_path / "cache" / "manifest.json").exists()
    manifest = prepare(root, tmp_path / "cache", size=32, folds=2, holdout=0, skip_bad=True, **QUIET)
    assert len(manifest["entries"]) == 3 and "has no RT Structure Set" in manifest["unassigned_problems"][0]
    shutil.rmtree(lonely.parent.parent)

    # An ROI under another name: an error that names the file and the option.
    rs = next((root / days[0].split("_")[0] / days[0]).glob("RS.dcm"))
    ds = pydicom.dcmread(rs)
    ds.StructureSetROISequence[2].ROIName = "Magen"
    ds.save_as(rs)
    with pytest.raises(DataFormatError, match=r"RS.dcm: no ROI named stomach.*--rois stomach="):
        prepare(root, tmp_path / "c2", size=32, folds=2, holdout=0, **QUIET)
    prepare(root, tmp_path / "c2", size=32, folds=2, holdout=0, rois="stomach=magen|Stomach", **QUIET)

    # A contour moved half a slice off the planes.
    item = ds.ROIContourSequence[0].ContourSequence[0]
    points = np.asarray(item.ContourData, float).reshape(-1, 3)
    points[:, 2] += 1.5
    item.ContourData = [f"{v:.4f}" for v in points.ravel()]
    ds.save_as(rs)
    with pytest.raises(DataFormatError, match="off the series' slice planes"):
        prepare(root, tmp_path / "c3", size=32, folds=2, holdout=0, rois="stomach=magen|Stomach", **QUIET)


PEER_PYTHON = Path(__file__).resolve().parent.parent / ".venv-peer" / "bin" / "python"
VERIFY = """
import sys
from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
verify_dataset_integrity(sys.argv[1], num_processes=1)
print("verified", sys.argv[1])
"""


@pytest.mark.skipif(not PEER_PYTHON.is_file(), reason="nnU-Net's environment .venv-peer is made by `make peer-check`")
def test_the_export_passes_nnunets_own_dataset_check(cache_dir, tmp_path):
    """nnU-Net's verify_dataset_integrity (what `nnUNetv2_plan_and_preprocess --verify_dataset_integrity`
    runs) on both exports, in nnU-Net's own environment: gitseg never imports it."""
    for overlap in ("regions", "priority"):
        out = tmp_path / f"Dataset50{len(overlap)}_Gitseg"
        export_nnunet(cache_dir, out, overlap=overlap, **QUIET)
        done = subprocess.run([str(PEER_PYTHON), "-c", VERIFY, str(out)], capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0 and "verified" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]


def test_holes_islands_and_contours_in_any_order_rasterise_as_drawn(tmp_path):
    """A ring with an island in its hole and a separate blob on one slice, its contours written in
    reverse order: the even-odd fill gives the masks back exactly."""
    import pydicom

    from ensemble.predict.clinical import write_rtstruct
    from gitseg.data.rtstruct import roi_names, structure_masks

    image = np.full((3, 40, 40), 100, np.uint16)
    masks = np.zeros((3, 3, 40, 40), bool)
    yy, xx = np.mgrid[:40, :40]
    r = np.hypot(yy - 15, xx - 15)
    masks[1, 1] = ((r <= 10) & (r > 5)) | (r <= 2) | ((yy > 30) & (xx > 30))  # ring, island, blob
    masks[0, 0, 5:9, 5:9] = masks[2, 2, 20:30, 22:25] = True
    write_series(tmp_path / "MR", image, (3.0, 1.5, 1.5), "case1_day1")
    series = read_series(tmp_path / "MR")
    write_rtstruct(tmp_path / "RS.dcm", masks, series)
    ds = pydicom.dcmread(tmp_path / "RS.dcm")
    roi = ds.ROIContourSequence[1]
    assert len(roi.ContourSequence) == 4  # ring outline, hole outline, island, blob
    roi.ContourSequence = pydicom.Sequence(list(roi.ContourSequence)[::-1])
    ds.save_as(tmp_path / "RS.dcm")
    assert np.array_equal(structure_masks(tmp_path / "RS.dcm", series, roi_names({})), masks)


def test_a_peers_label_maps_are_scored_by_gitsegs_metric_on_every_holdout_case_day(cache_dir, exports, tmp_path):
    """What bench_nnunet.py scores nnU-Net with: the export's own holdout labels as a prediction score
    perfectly (regions: nothing lost); one label per voxel scores the overlap it loses; a mirrored
    prediction scores lower; a missing case-day is an error, not a smaller holdout."""
    from ensemble.selection.evaluate import score_label_volumes

    cache = Cache(cache_dir)
    shutil.copytree(exports["regions"][0] / "labelsTs", tmp_path / "regions" / "labelsTs")  # damaged below
    scores, rows = score_label_volumes(cache, tmp_path / "regions" / "labelsTs")
    assert scores["score"] == pytest.approx(1.0) and scores["dice"] == pytest.approx(1.0)
    assert len(rows) == 3 * len(cache.case_days(holdout=True))
    lossy, _ = score_label_volumes(cache, exports["priority"][0] / "labelsTs", overlap="priority")
    assert lossy["dice/large_bowel"] < 1.0 and lossy["dice/stomach"] == pytest.approx(1.0)
    first = sorted((tmp_path / "regions" / "labelsTs").iterdir())[0]
    import nibabel as nib

    image = nib.load(first)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[::-1].copy(), image.affine), first)  # mirrored left-right
    mirrored, _ = score_label_volumes(cache, tmp_path / "regions" / "labelsTs")
    assert mirrored["score"] < scores["score"] - 0.01
    first.unlink()
    with pytest.raises(FileNotFoundError, match=first.name):
        score_label_volumes(cache, tmp_path / "regions" / "labelsTs")


def test_the_layout_is_told_from_the_files(synth_root, cache_dir, exports, tmp_path):
    """--format auto: a Kaggle tree, an nnU-Net data set, DICOM files without a suffix (as exports
    often name them); anything else is an error that names --format."""
    from gitseg.data.sources import detect_format

    assert detect_format(synth_root) == "uwmgi" and detect_format(exports["regions"][0]) == "nnunet"
    for path in write_series(tmp_path / "export" / "p1", np.ones((2, 8, 8), np.uint16), (3.0, 1.5, 1.5), "case1_day1"):
        path.rename(path.with_suffix(""))
    assert detect_format(tmp_path / "export") == "dicom"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("no scans here")
    with pytest.raises(DataFormatError, match="--format"):
        detect_format(tmp_path / "other")
