"""Bad and hostile input, fuzzed (hypothesis): every input either works or gives the error that
names it (DataFormatError for the data, ConfigError for configs), never another exception.

60 examples per test in the suite; GITSEG_FUZZ_EXAMPLES=2000 for a longer hunt."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gitseg.config import ConfigError, load_config
from gitseg.data.uwmgi import CLASSES, DataFormatError, index_root, read_train_csv, rle_decode
from search.space import check_space, parse_space

# The suite's examples are the same on every run (derandomize: CI never meets a new one by chance);
# a longer hunt with GITSEG_FUZZ_EXAMPLES draws new ones.
HUNT = "GITSEG_FUZZ_EXAMPLES" in os.environ
FAST = settings(max_examples=int(os.environ.get("GITSEG_FUZZ_EXAMPLES", 60)), deadline=None, derandomize=not HUNT,
                database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
RLE_TEXT = st.one_of(st.text(max_size=40),
                     st.lists(st.integers(-5, 40), max_size=10).map(lambda xs: " ".join(map(str, xs))),
                     st.lists(st.integers(-2**70, 2**70), max_size=4).map(lambda xs: " ".join(map(str, xs))))


@FAST
@given(RLE_TEXT, st.integers(1, 8), st.integers(1, 8))
def test_any_rle_string_decodes_or_is_a_data_error(rle, height, width):
    try:
        mask = rle_decode(rle, (height, width))
    except DataFormatError as exc:
        assert str(exc)
    else:
        assert mask.shape == (height, width) and mask.dtype == bool


CSV_CELL = st.one_of(st.text(max_size=12), st.sampled_from(["", "1 2", "case1_day1_slice_0001", *CLASSES]))


@FAST
@given(st.lists(st.tuples(CSV_CELL, CSV_CELL, CSV_CELL), max_size=6),
       st.sampled_from(["id,class,segmentation", "id,class", "", "x,y,z", "id,class,segmentation,extra"]))
def test_any_train_csv_reads_or_is_a_data_error(rows, header):
    root = Path(tempfile.mkdtemp())
    try:
        text = header + "\n" + "\n".join(",".join(f'"{c}"' for c in row) for row in rows)
        (root / "train.csv").write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            table = read_train_csv(root)
        except DataFormatError as exc:
            assert str(root / "train.csv") in str(exc)
        else:
            assert list(table.columns)[:3] == ["id", "class", "segmentation"]
            assert set(table["class"].dropna()) <= set(CLASSES)
    finally:
        shutil.rmtree(root)


FILE_NAME = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0"), min_size=1, max_size=30),
    st.builds(lambda n, w, h, s: f"slice_{n}_{w}_{h}_{s}_{s}.png", st.integers(-1, 99999), st.integers(-1, 400),
              st.integers(-1, 400), st.sampled_from(["1.50", "1.5", "x", "0.00"])))


@FAST
@given(FILE_NAME)
def test_any_file_name_in_a_scan_folder_is_indexed_or_reported_by_name(name):
    if name in (".", ".."):
        return
    root = Path(tempfile.mkdtemp())
    try:
        scans = root / "train" / "case1" / "case1_day1" / "scans"
        scans.mkdir(parents=True)
        (root / "train.csv").write_text("id,class,segmentation\n")
        (scans / name).write_bytes(b"not a png")
        try:
            slices, problems = index_root(root, "train")
        except (DataFormatError, FileNotFoundError) as exc:  # e.g. no *.png at all: the folder is named
            assert str(root / "train") in str(exc)
        else:  # a .png is either indexed (its pixels are checked when decoded) or reported by name
            assert isinstance(slices, pd.DataFrame) and all(isinstance(p, str) for p in problems)
            assert len(slices) + len(problems) >= 1
            assert all(name in p or "train.csv" in p or "case1_day1" in p for p in problems), problems
    finally:
        shutil.rmtree(root)


CONFIG_KEYS = ["train.lr", "train.epochs", "train.batch_size", "data.channels", "data.stride", "model.arch",
               "model.encoder", "train.loss", "model.head_prior", "train.ema", "nonexistent.key", "train"]
VALUE_TEXT = st.one_of(st.text(max_size=16), st.sampled_from(["1e-3", "-1", "0", "nan", "inf", "[1, 2]", "{a: 1}",
                                                              "null", "true", "Unet", "[{name: dice}]"]))


@FAST
@given(st.sampled_from(CONFIG_KEYS), VALUE_TEXT)
def test_any_config_override_loads_or_is_a_config_error(key, value):
    try:
        load_config(None, [f"{key}={value}"])
    except ConfigError as exc:
        assert str(exc)


SPEC = st.one_of(
    st.builds(lambda lo, hi: {"uniform": [lo, hi]}, st.floats(allow_nan=True), st.floats(allow_nan=True)),
    st.builds(lambda lo, hi: {"loguniform": [lo, hi]}, st.floats(-1, 1), st.floats(-1, 1)),
    st.builds(lambda xs: {"choice": xs}, st.lists(st.one_of(st.integers(-3, 300), st.text(max_size=5)), max_size=3)),
    st.builds(lambda lo, hi: {"int": [lo, hi]}, st.integers(-5, 5), st.integers(-5, 5)),
    st.sampled_from([{}, {"normal": [0, 1]}, {"uniform": "x"}, {"choice": []}, None, 3, "x"]),
)


@FAST
@given(st.dictionaries(st.sampled_from(["train.lr", "train.epochs", "data.augment", "train.weight_decay",
                                        "model.arch", "data.channels", "bogus"]), SPEC, max_size=3))
def test_any_search_space_parses_or_is_a_config_error(space):
    base = {"train": {"lr": 1e-3, "epochs": 2, "weight_decay": 1e-4}, "data": {"augment": 0.5, "channels": 3},
            "model": {"arch": "Unet", "encoder": "tu-test_resnet"}}
    try:
        params = parse_space(space)
        check_space(params, base, cache_size=64)
    except ConfigError as exc:
        assert str(exc)
