"""The real data's shapes end to end, on few case-days: every real image size and spacing and both
slice counts (144 and 80) through synth, prepare, a training step, validation at the original size,
OOF, the ensemble and predict (issue 12). The network input is small; everything at the original
size (masks, OOF, scoring, post-processing, submission, NIfTI) is real."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from test_ensemble import QUIET, write_refit_run

from ensemble.predict.tree import predict_tree
from ensemble.selection.build import build_ensemble
from gitseg.data.cache import Cache, prepare
from gitseg.data.synth import REAL_SCANS, write_dataset
from gitseg.oof import load_oof


@pytest.fixture(scope="module")
def real_shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    data = root / "uwmgi"
    # One case per geometry (seed 0): 360 x 310 lands in the holdout (ensemble evaluation, predict),
    # the other three, the 80-slice scan among them, in the two folds (training, validation, OOF).
    write_dataset(data, cases=1, test_cases=len(REAL_SCANS), profile="shapes")
    prepare(data, root / "cache", size=64, folds=2, holdout=0.25, seed=0, log=lambda *_: None)
    return root


def test_every_real_geometry_through_prepare_oof_ensemble_and_predict(real_shapes):
    root, cache = real_shapes, Cache(real_shapes / "cache")
    geometry = {(e["width"], e["height"], e["slices"]) for e in cache.manifest["entries"]}
    assert geometry == {(w, h, sl) for w, h, _, sl, _ in REAL_SCANS}
    # One configuration on both folds: a short epoch, validation and OOF at the original size. Without
    # TTA: what is tested is the sizes, and every inference at them (OOF, latency, the holdout's
    # variants, predict) then takes half the time.
    run = write_refit_run(root / "cache", root / "search" / "shapes", configs=({"train.lr": 0.003},), tta="none")
    for case_day in cache.case_days():
        e = cache.entries[case_day]
        fold_oof = run / "refit_runs" / f"refit-0-fold{e['fold']}" / "oof"
        assert load_oof(fold_oof, case_day).shape == (3, e["slices"], e["height"], e["width"])
    manifest = build_ensemble(run, topk=1, out=root / "ensemble", **QUIET)
    assert manifest.scores.holdout.case_days and 0 <= manifest.scores.holdout.score <= 1
    result = predict_tree(root / "ensemble", root / "uwmgi", root / "predict", nifti=root / "predict" / "nifti",
                          **QUIET)
    assert not result["failed"] and len(result["written"]) == len(REAL_SCANS)
    sample = pd.read_csv(root / "uwmgi" / "sample_submission.csv", dtype=str, keep_default_na=False)
    submission = pd.read_csv(root / "predict" / "submission.csv", dtype=str, keep_default_na=False)
    assert len(submission) == len(sample)
    assert list(zip(submission["id"], submission["class"])) == list(zip(sample["id"], sample["class"]))
    shapes = set()
    for case_day in result["written"]:
        labels = nib.load(root / "predict" / "nifti" / f"{case_day}.nii.gz")
        shapes.add(labels.shape)
        assert np.asarray(labels.dataobj).max() <= 3
    # NIfTI is (W, H, D) in RAS order; every geometry came back at its own size and slice count.
    assert {(w, h, d) for w, h, d in shapes} == {(w, h, sl) for w, h, _, sl, _ in REAL_SCANS}
