"""The data layer on the synthetic tree, and one test per bad-input error."""

import shutil

import cv2
import numpy as np
import pandas as pd
import pytest

from gitseg.data.uwmgi import CLASSES, DataFormatError, index_root, load_volume, png_header, rle_decode, slice_file_name


def test_index_and_load_volume(synth_root):
    slices, problems = index_root(synth_root)
    assert problems == []
    assert list(slices.columns[:4]) == ["case_day", "case", "day", "slice"]
    case_day = slices["case_day"].iloc[0]
    vol = load_volume(synth_root, case_day)
    rows = slices[slices["case_day"] == case_day]
    d, h, w = vol.image.shape
    assert vol.image.dtype == np.uint16 and d == len(rows)
    assert (h, w) == (rows["height"].iloc[0], rows["width"].iloc[0])
    assert vol.masks.shape == (3, d, h, w) and vol.masks.dtype == bool
    assert vol.spacing[0] == 3.0 and vol.spacing[1] == rows["spacing"].iloc[0]
    assert vol.slice_ids[0] == f"{case_day}_slice_0001" and vol.slice_ids == sorted(vol.slice_ids)
    # masks are exactly the RLEs of train.csv, in class order
    table = pd.read_csv(synth_root / "train.csv")
    for c, cls in enumerate(CLASSES):
        for z in (0, d // 2):
            rle = table[(table["id"] == vol.slice_ids[z]) & (table["class"] == cls)]["segmentation"].iloc[0]
            assert np.array_equal(vol.masks[c, z], rle_decode(rle, (h, w)))


def test_width_comes_first_in_file_names(synth_root):
    slices, _ = index_root(synth_root)
    wide = slices[slices["width"] != slices["height"]]
    assert len(wide), "the tiny set should contain a non-square (360x310-like) scan"
    row = wide.iloc[0]
    image = cv2.imread(row["path"], cv2.IMREAD_UNCHANGED)
    assert image.shape == (row["height"], row["width"]) and row["width"] > row["height"]
    assert png_header(row["path"])[:2] == (row["height"], row["width"])
    assert slice_file_name(1, 310, 360, 1.5) == "slice_0001_360_310_1.50_1.50.png"


def test_test_split_has_no_labels(synth_root):
    slices, problems = index_root(synth_root, "test")
    assert problems == [] and len(slices)
    vol = load_volume(synth_root, slices["case_day"].iloc[0])
    assert not vol.labelled and not vol.masks.any()


# --- bad input -------------------------------------------------------------------------------

def test_root_without_train_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no train/ folder"):
        index_root(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        index_root(tmp_path / "nope")


def test_root_without_train_csv(synth_copy):
    (synth_copy / "train.csv").unlink()
    with pytest.raises(FileNotFoundError, match="no train.csv"):
        index_root(synth_copy)


def test_csv_without_expected_columns(synth_copy):
    pd.read_csv(synth_copy / "train.csv").rename(columns={"segmentation": "rle"}).to_csv(
        synth_copy / "train.csv", index=False)
    with pytest.raises(DataFormatError, match="lacks the column"):
        index_root(synth_copy)


def first_scan_dir(root):
    return sorted((root / "train").glob("case*/case*_day*/scans"))[0]


def test_bad_file_name_is_reported(synth_copy):
    scans = first_scan_dir(synth_copy)
    shutil.copy(sorted(scans.glob("*.png"))[0], scans / "slice_1_64_64.png")
    _, problems = index_root(synth_copy)
    assert len(problems) == 1 and "slice_1_64_64.png" in problems[0] and "does not match" in problems[0]


def test_png_that_does_not_decode(synth_copy):
    scans = first_scan_dir(synth_copy)
    victim = sorted(scans.glob("*.png"))[3]
    victim.write_bytes(b"not a png at all")
    with pytest.raises(DataFormatError, match="does not decode"):
        load_volume(synth_copy, scans.parent.name)


def test_png_size_differs_from_name(synth_copy):
    scans = first_scan_dir(synth_copy)
    victim = sorted(scans.glob("*.png"))[2]
    cv2.imwrite(str(victim), np.zeros((10, 12), np.uint16))
    with pytest.raises(DataFormatError, match="but its name says"):
        load_volume(synth_copy, scans.parent.name)


def test_malformed_rle_in_csv(synth_copy):
    table = pd.read_csv(synth_copy / "train.csv")
    case_day = first_scan_dir(synth_copy).parent.name
    row = table.index[table["id"] == f"{case_day}_slice_0002"][0]
    table.loc[row, "segmentation"] = "5 3 1 1"
    table.to_csv(synth_copy / "train.csv", index=False)
    with pytest.raises(DataFormatError, match=f"{case_day}_slice_0002 large_bowel: RLE runs are unsorted"):
        load_volume(synth_copy, case_day)


def test_ids_without_image(synth_copy):
    scans = first_scan_dir(synth_copy)
    last = sorted(scans.glob("*.png"))[-1]
    last.unlink()
    _, problems = index_root(synth_copy)
    assert any("has no image" in p and scans.parent.name in p for p in problems)


def test_missing_slice_in_the_middle(synth_copy):
    scans = first_scan_dir(synth_copy)
    sorted(scans.glob("*.png"))[5].unlink()
    _, problems = index_root(synth_copy)
    assert any("slice numbers are not" in p for p in problems)
    with pytest.raises(DataFormatError, match="format problems"):
        load_volume(synth_copy, scans.parent.name)
