import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from gitseg.data.uwmgi import DataFormatError, rle_decode, rle_encode


def test_known_vectors_from_data_md():
    # On a 310x360 image (H=310, W=360): (row 0, col 1) is "2 1", (row 1, col 0) is "361 1".
    mask = np.zeros((310, 360), dtype=bool)
    mask[0, 1] = True
    assert rle_encode(mask) == "2 1"
    mask[:] = False
    mask[1, 0] = True
    assert rle_encode(mask) == "361 1"
    decoded = rle_decode("361 1", (310, 360))
    assert decoded.sum() == 1 and decoded[1, 0]


def test_run_spanning_rows_and_last_pixel():
    mask = np.zeros((3, 4), dtype=bool)
    mask[0, 3] = mask[1, 0] = mask[1, 1] = True
    mask[2, 3] = True
    assert rle_encode(mask) == "4 3 12 1"
    assert np.array_equal(rle_decode("4 3 12 1", (3, 4)), mask)


@pytest.mark.parametrize("empty", ["", "   ", None, float("nan"), np.nan])
def test_empty_rle_decodes_to_empty_mask(empty):
    out = rle_decode(empty, (5, 7))
    assert out.shape == (5, 7) and out.dtype == bool and not out.any()


def test_empty_mask_encodes_to_empty_string():
    assert rle_encode(np.zeros((4, 4), bool)) == ""


@settings(max_examples=200, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 40), st.integers(1, 40))))
def test_round_trip(mask):
    rle = rle_encode(mask)
    assert np.array_equal(rle_decode(rle, mask.shape), mask)
    if rle:  # runs are sorted, positive and non-overlapping
        values = list(map(int, rle.split()))
        starts, lengths = values[0::2], values[1::2]
        assert all(n > 0 for n in lengths)
        assert all(s2 > s1 + l1 for s1, l1, s2 in zip(starts, lengths, starts[1:]))


@pytest.mark.parametrize("rle, why", [
    ("1 2 3", "odd number"),
    ("1 x", "not an integer"),
    ("0 2", "below 1"),
    ("3 0", "below 1"),
    ("10 5", "past the end"),
    ("5 1 2 1", "unsorted or overlapping"),
    ("2 3 4 1", "unsorted or overlapping"),
])
def test_malformed_rle_is_a_clear_error(rle, why):
    with pytest.raises(DataFormatError, match=why):
        rle_decode(rle, (3, 4))


def test_encode_rejects_3d():
    with pytest.raises(ValueError, match="2D"):
        rle_encode(np.zeros((2, 2, 2), bool))
