"""The whole pipeline on a data set of each new layout: prepare, a small search on local Ray (with its
refit), the ensemble, the report, robustness and predict, the predictions in the source's own
geometry.

About two minutes per layout: more than `make test` can afford beside the demo's own search, so they
are their own target, `make test-sources` (marker `sources`)."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from conftest import ENV, RAY, write_configs
from test_sources import another_tools_data_set, dicom_cases

from gitseg.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.sources]


def search_ensemble_report(cache, tmp):
    """`gitseg search` (one configuration, one epoch, both folds refit) in its own process, then
    `gitseg ensemble` and `gitseg report` here; returns the ensemble folder."""
    config = write_configs(tmp, cache, "src", epochs=1, num_samples=1, points=[{"train.lr": 0.003}],
                           refit={"topk": 1})
    subprocess.run([RAY, "stop", "--force"], capture_output=True, env=ENV)
    done = subprocess.run([sys.executable, "-m", "search", "--config", str(config)], env=ENV, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = tmp / "storage" / "src"
    assert main(["ensemble", "--run", str(run), "--topk", "1"]) == 0
    assert main(["report", "--run", str(run)]) == 0
    manifest = json.loads((run / "ensemble" / "ensemble.json").read_text())
    assert manifest["scores"]["holdout"]["case_days"]
    return run / "ensemble"


def test_an_nnunet_data_set_through_search_ensemble_and_predict(synth_root, tmp_path):
    days = sorted(p.name for p in (synth_root / "train").glob("case*/case*_day*"))
    root = tmp_path / "Dataset777_Other"
    another_tools_data_set(synth_root, root, days)
    assert main(["prepare", "--data", str(root), "--out", str(tmp_path / "cache"), "--size", "64", "--folds", "2",
                 "--holdout", "0.2", "--labels", "small_bowel=ileum",
                 "--case-pattern", r"(?P<case>pat\d+)_visit(?P<day>\d+)"]) == 0
    ensemble = search_ensemble_report(tmp_path / "cache", tmp_path)
    # The robustness report reads the holdout's scans from the source's NIfTI files.
    assert main(["robustness", "--ensemble", str(ensemble), "--corruptions", "bias_field", "--severities", "1"]) == 0
    images = root / "imagesTr"
    assert main(["predict", "--ensemble", str(ensemble), "--nifti-in", str(images), "--out",
                 str(tmp_path / "pred")]) == 0
    for path in sorted(images.iterdir()):
        source = nib.load(path)
        out = nib.load(tmp_path / "pred" / path.name.replace("_0000", ""))
        assert out.shape == source.shape and np.allclose(out.affine, source.affine)  # the source's own grid


def test_contoured_dicom_cases_through_search_ensemble_and_predict(synth_root, tmp_path):
    import pydicom

    days = sorted(p.name for p in (synth_root / "train").glob("case*/case*_day*"))
    dicom_cases(synth_root, tmp_path / "patients", days)
    assert main(["prepare", "--data", str(tmp_path / "patients"), "--out", str(tmp_path / "cache"), "--size", "64",
                 "--folds", "2", "--holdout", "0.2"]) == 0
    ensemble = search_ensemble_report(tmp_path / "cache", tmp_path)
    series = tmp_path / "patients" / days[0].split("_")[0] / days[0] / "MR"
    assert main(["predict", "--ensemble", str(ensemble), "--dicom", str(series), "--out", str(tmp_path / "pred")]) == 0
    rtstruct = pydicom.dcmread(tmp_path / "pred" / "rtstruct.dcm")
    first = pydicom.dcmread(next(series.iterdir()), stop_before_pixels=True)
    assert rtstruct.FrameOfReferenceUID == first.FrameOfReferenceUID  # the series' frame of reference
    referenced = rtstruct.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
    assert referenced.RTReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
