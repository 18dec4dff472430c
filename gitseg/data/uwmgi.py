"""The UW-Madison GI Tract on-disk format: slice file names, train.csv, RLE, volumes.

Everything here follows docs/DATA.md. The same code reads the real Kaggle download and the
synthetic data written by `gitseg synth`, so the synthetic generator writes through the helpers
in this module (file names, RLE) rather than its own copies.
"""

from __future__ import annotations

import dataclasses
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

CLASSES = ("large_bowel", "small_bowel", "stomach")
SLICE_THICKNESS_MM = 3.0

# slice_0001_360_310_1.50_1.50.png: width 360 (columns), height 310 (rows), pixel spacing in mm.
SLICE_NAME = re.compile(r"^slice_(\d{4})_(\d+)_(\d+)_(\d+\.\d{2})_(\d+\.\d{2})\.png$")
CASE_DAY = re.compile(r"^case(\d+)_day(\d+)$")
CASE_DAY_IN_TEXT = re.compile(r"case\d+_day\d+")
CSV_COLUMNS = ("id", "class", "segmentation")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class DataFormatError(ValueError):
    """The data on disk does not follow the UWMGI format; `problems` lists each one."""

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = list(problems or [])
        if self.problems:
            shown = "\n  ".join(self.problems[:20])
            more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
            message = f"{message}\n  {shown}{more}"
        super().__init__(message)


# ---------------------------------------------------------------------------------------------
# Names


def case_day_name(case: int, day: int) -> str:
    return f"case{case}_day{day}"


def slice_id(case_day: str, slice_no: int) -> str:
    return f"{case_day}_slice_{slice_no:04d}"


def slice_file_name(slice_no: int, height: int, width: int, spacing_mm: float) -> str:
    """The PNG name of one slice; note that the name puts the width first."""
    return f"slice_{slice_no:04d}_{width}_{height}_{spacing_mm:.2f}_{spacing_mm:.2f}.png"


def parse_case_day(name: str) -> tuple[int, int]:
    match = CASE_DAY.match(name)
    if match is None:
        raise DataFormatError(f"{name!r} is not a case-day name; expected e.g. 'case123_day20'")
    return int(match.group(1)), int(match.group(2))


# ---------------------------------------------------------------------------------------------
# RLE


def rle_encode(mask: np.ndarray) -> str:
    """Kaggle RLE of a 2D mask `(H, W)`: 1-based starts over the row-major flattening."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"rle_encode expects a 2D (H, W) mask, got shape {mask.shape}")
    flat = np.concatenate([[False], mask.astype(bool).ravel(), [False]])
    edges = np.flatnonzero(flat[1:] != flat[:-1])  # 0-based start, then end (exclusive), ...
    starts, ends = edges[0::2], edges[1::2]
    pairs = np.empty(2 * len(starts), dtype=np.int64)
    pairs[0::2] = starts + 1
    pairs[1::2] = ends - starts
    return " ".join(map(str, pairs.tolist()))


def _is_empty_rle(rle) -> bool:
    if isinstance(rle, str):
        return rle.strip() == ""
    if rle is None:
        return True
    import pandas as pd  # loaded already wherever a table holds RLE (here only for a non-string cell)

    return bool(pd.isna(rle))  # NaN from pandas, pd.NA from string columns


def rle_decode(rle, shape: tuple[int, int]) -> np.ndarray:
    """Decode a Kaggle RLE into a bool mask of `shape` `(H, W)`; empty/None/NaN give all False.

    Raises DataFormatError for an RLE that is malformed, out of bounds, unsorted or overlapping.
    """
    height, width = int(shape[0]), int(shape[1])
    mask = np.zeros(height * width, dtype=bool)
    if _is_empty_rle(rle):
        return mask.reshape(height, width)
    if not isinstance(rle, str):
        raise DataFormatError(f"RLE must be a string of 'start length' pairs, got {type(rle).__name__}")
    tokens = rle.split()
    try:
        values = [int(t) for t in tokens]
    except ValueError:
        raise DataFormatError(f"RLE has a token that is not an integer: {rle[:60]!r}") from None
    if len(values) % 2:
        raise DataFormatError(f"RLE has an odd number of values ({len(values)}): {rle[:60]!r}")
    # Checked on Python ints, before int64 could overflow.
    if any(v < 1 for v in values):
        raise DataFormatError(f"RLE has a start below 1 or a length below 1: {rle[:60]!r}")
    if any(v > height * width for v in values):
        raise DataFormatError(f"RLE runs past the end of a {height}x{width} image: {rle[:60]!r}")
    numbers = np.array(values, dtype=np.int64)
    starts, lengths = numbers[0::2] - 1, numbers[1::2]
    if (starts < 0).any() or (lengths <= 0).any():
        raise DataFormatError(f"RLE has a start below 1 or a length below 1: {rle[:60]!r}")
    ends = starts + lengths
    if ends[-1] > height * width or (ends > height * width).any():
        raise DataFormatError(
            f"RLE runs past the end of a {height}x{width} image ({int(ends.max())} > {height * width})"
        )
    if (starts[1:] < ends[:-1]).any():
        raise DataFormatError(f"RLE runs are unsorted or overlapping: {rle[:60]!r}")
    # Mark run boundaries and integrate: O(pixels), no Python loop over runs.
    delta = np.zeros(height * width + 1, dtype=np.int32)
    np.add.at(delta, starts, 1)
    np.add.at(delta, ends, -1)
    mask = np.cumsum(delta[:-1]) > 0
    return mask.reshape(height, width)


# ---------------------------------------------------------------------------------------------
# PNG


def png_header(path: Path) -> tuple[int, int, int]:
    """(height, width, bit depth) from a PNG's IHDR chunk, without decoding the image."""
    with open(path, "rb") as f:
        head = f.read(33)
    if len(head) < 33 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise DataFormatError(f"{path} is not a PNG file")
    width, height = struct.unpack(">II", head[16:24])
    return height, width, head[24]


def read_slice(path: Path, height: int, width: int) -> np.ndarray:
    """Decode one 16-bit slice PNG and check it against the size in its name."""
    import cv2  # heavy: OpenCV loads only where PNGs are read or written

    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise DataFormatError(f"{path} does not decode as an image (corrupt or truncated PNG?)")
    if image.ndim != 2:
        raise DataFormatError(f"{path} has {image.shape[2]} channels; UWMGI slices are grayscale")
    if image.shape != (height, width):
        raise DataFormatError(
            f"{path} is {image.shape[1]}x{image.shape[0]} (WxH) but its name says {width}x{height}"
        )
    return image.astype(np.uint16, copy=False)


# ---------------------------------------------------------------------------------------------
# Index


def _find_split_dir(root: Path, split: str) -> Path:
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist; point it at the folder that holds train.csv "
                                f"and train/")
    split_dir = root / split
    if not split_dir.is_dir():
        have = sorted(p.name for p in root.iterdir())[:10]
        raise FileNotFoundError(
            f"no {split}/ folder under {root} (found: {', '.join(have) or 'nothing'}); point the data "
            f"root at the folder that holds train.csv and train/ (or test/), e.g. the Kaggle download, "
            f"or make one with `gitseg synth --out DIR`"
        )
    return split_dir


def read_train_csv(root: Path) -> pd.DataFrame:
    """train.csv as a table with columns id, class, segmentation (NaN for an empty mask)."""
    path = Path(root) / "train.csv"
    if not path.is_file():
        raise FileNotFoundError(
            f"no train.csv under {root}; point the data root at the folder that holds train.csv and "
            f"train/ (for unlabelled scans use the test/ split)"
        )
    import pandas as pd  # heavy: only the Kaggle tree's tables need it (not the DICOM and NIfTI paths)

    try:
        table = pd.read_csv(path, dtype={"id": str, "class": str, "segmentation": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"{path} is not a readable csv: {exc}") from None
    missing = [c for c in CSV_COLUMNS if c not in table.columns]
    if missing:
        raise DataFormatError(
            f"{path} lacks the column(s) {', '.join(missing)}; expected the header "
            f"'{','.join(CSV_COLUMNS)}' (found {', '.join(map(str, table.columns))})"
        )
    unknown = sorted(set(table["class"].dropna()) - set(CLASSES))
    if unknown:
        raise DataFormatError(f"{path} has unknown classes {unknown}; expected {list(CLASSES)}")
    return table


def index_root(root, split: str = "train", case_days=None) -> tuple[pd.DataFrame, list[str]]:
    """Index a UWMGI tree into a slice table and a list of problems found on the way.

    Columns: case_day, case, day, slice, id, path, height, width, spacing (mm), labelled, and one
    RLE column per class (NaN where empty or unlabelled). Bad file names and ids without an image
    are reported in `problems`, never silently dropped; the caller decides to stop or skip.
    `case_days` limits the index to those case-days (train.csv ids of others are not checked).
    """
    root = Path(root)
    split_dir = _find_split_dir(root, split)
    problems: list[str] = []
    rows = []
    for case_dir in sorted(split_dir.iterdir()):
        if not case_dir.is_dir():
            continue
        for day_dir in sorted(case_dir.iterdir()):
            if not day_dir.is_dir() or (case_days is not None and day_dir.name not in case_days):
                continue
            try:
                case, day = parse_case_day(day_dir.name)
            except DataFormatError as exc:
                problems.append(f"{day_dir}: {exc}")
                continue
            if not day_dir.name.startswith(case_dir.name + "_"):
                problems.append(f"{day_dir}: case-day folder is not inside its case folder")
                continue
            scans = day_dir / "scans"
            for path in sorted(scans.glob("*.png")) if scans.is_dir() else []:
                match = SLICE_NAME.match(path.name)
                if match is None:
                    problems.append(
                        f"{path}: file name does not match slice_SSSS_W_H_PW_PH.png "
                        f"(e.g. slice_0001_266_266_1.50_1.50.png)"
                    )
                    continue
                slice_no, width, height, pw, ph = match.groups()
                rows.append(
                    dict(case_day=day_dir.name, case=case, day=day, slice=int(slice_no),
                         id=slice_id(day_dir.name, int(slice_no)), path=str(path),
                         height=int(height), width=int(width), spacing=float(ph),
                         spacing_w=float(pw))
                )
    if not rows and not problems:
        raise FileNotFoundError(f"no slice PNGs under {split_dir}/case*/case*_day*/scans/")
    import pandas as pd  # heavy: only the Kaggle tree's tables need it

    slices = pd.DataFrame(rows, columns=["case_day", "case", "day", "slice", "id", "path", "height",
                                         "width", "spacing", "spacing_w"])
    slices = slices.sort_values(["case", "day", "slice"], kind="stable").reset_index(drop=True)
    problems += _check_volume_consistency(slices)

    labelled = split == "train"
    for name in CLASSES:
        slices[name] = np.nan
    slices[list(CLASSES)] = slices[list(CLASSES)].astype(object)
    slices["labelled"] = labelled
    if labelled:
        table = read_train_csv(root)
        if case_days is not None:
            prefixes = tuple(f"{cd}_slice_" for cd in case_days)
            table = table[table["id"].str.startswith(prefixes)]
        known = set(slices["id"])
        orphan = sorted(set(table["id"]) - known)
        problems += [f"train.csv: id {i} has no image under {split_dir}" for i in orphan]
        rle = {(i, c): s for i, c, s in table[list(CSV_COLUMNS)].itertuples(index=False, name=None)}
        for name in CLASSES:
            slices[name] = [rle.get((i, name), np.nan) for i in slices["id"]]
    return slices, problems


def problems_by_case_day(problems: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Problems grouped by the case-day they name; those that name none apart."""
    by_case_day: dict[str, list[str]] = {}
    loose = []
    for problem in problems:
        match = CASE_DAY_IN_TEXT.search(problem)
        if match:
            by_case_day.setdefault(match.group(0), []).append(problem)
        else:
            loose.append(problem)
    return by_case_day, loose


def _check_volume_consistency(slices: pd.DataFrame) -> list[str]:
    """One size and spacing per case-day and slice numbers 1..D without gaps."""
    problems = []
    for case_day, group in slices.groupby("case_day", sort=False):
        if group[["height", "width", "spacing"]].drop_duplicates().shape[0] > 1:
            problems.append(f"{case_day}: slices disagree on image size or spacing")
        numbers = group["slice"].to_numpy()
        expected = np.arange(1, len(numbers) + 1)
        if not np.array_equal(np.sort(numbers), expected):
            missing = sorted(set(range(1, int(numbers.max()) + 1)) - set(numbers.tolist()))
            problems.append(f"{case_day}: slice numbers are not 1..{len(numbers)} (missing {missing[:10]})")
    return problems


# ---------------------------------------------------------------------------------------------
# Volumes


@dataclasses.dataclass
class Volume:
    """One case-day scan stacked in slice order."""

    case_day: str
    image: np.ndarray  # (D, H, W) uint16
    masks: np.ndarray  # (3, D, H, W) bool, class order CLASSES; all False when unlabelled
    spacing: tuple[float, float, float]  # (slice thickness, row spacing, column spacing) in mm
    slice_ids: list[str]
    labelled: bool


def volume_from_rows(rows: pd.DataFrame) -> Volume:
    """Decode the slices and masks of one case-day (the rows of `index_root` for it)."""
    rows = rows.sort_values("slice")
    first = rows.iloc[0]
    height, width = int(first["height"]), int(first["width"])
    image = np.stack([read_slice(Path(p), height, width) for p in rows["path"]])
    masks = np.zeros((len(CLASSES), len(rows), height, width), dtype=bool)
    for c, name in enumerate(CLASSES):
        for z, (sid, rle) in enumerate(zip(rows["id"], rows[name])):
            try:
                masks[c, z] = rle_decode(rle, (height, width))
            except DataFormatError as exc:
                raise DataFormatError(f"train.csv, {sid} {name}: {exc}") from None
    return Volume(
        case_day=str(first["case_day"]),
        image=image,
        masks=masks,
        spacing=(SLICE_THICKNESS_MM, float(first["spacing"]), float(first["spacing_w"])),
        slice_ids=list(rows["id"]),
        labelled=bool(first["labelled"]),
    )


def load_volume(root, case_day: str, split: str | None = None) -> Volume:
    """Load one case-day from a UWMGI root (train/ if present, else test/)."""
    root = Path(root)
    case, _ = parse_case_day(case_day)
    if split is None:
        split = "train" if (root / "train" / f"case{case}" / case_day).is_dir() else "test"
    day_dir = _find_split_dir(root, split) / f"case{case}" / case_day
    if not day_dir.is_dir():
        raise FileNotFoundError(f"no scan folder {day_dir}; list the case-days with `gitseg prepare` "
                                f"or ls {root}/{split}")
    slices, problems = index_root(root, split, case_days={case_day})
    if problems:
        raise DataFormatError(f"{case_day} has format problems", problems)
    return volume_from_rows(slices)
