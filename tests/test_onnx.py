"""`gitseg export --onnx` and `gitseg predict --runtime onnx` (ensemble/deploy/) on the small demo's
ensemble (conftest.small_demo): the same masks as the PyTorch engine within the stated tolerance,
and no PyTorch import on the ONNX path."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ENV

from ensemble.deploy.runtime import ONNX_MANIFEST, OnnxEnsemble, load_engine
from ensemble.predict.review import votes_for
from gitseg.data.uwmgi import index_root, volume_from_rows

pytestmark = pytest.mark.slow
# ONNX Runtime runs the networks in float32. Against PyTorch in float32 it must be the same
# computation: probabilities within float16's step of the stored output and float32's summation order,
# masks equal up to a voxel at a threshold (measured: 2.4e-4, masks identical). Against the PyTorch
# engine as shipped, which computes in bfloat16 on a CPU with native bf16 (this one's AVX512-BF16), the
# probabilities differ by bf16's rounding (measured 0.002); the masks then differ wherever a probability
# sits at a threshold or a component at the minimum size, which on this test's barely trained networks
# and tiny organs moved up to 3% of an organ's voxels. That is bf16 against float32, not ONNX against
# PyTorch (BENCHMARKS.md, "ONNX Runtime"), so only the probabilities are held to it here.
FP32_PROB_TOLERANCE, FP32_MASK_AGREEMENT = 2e-3, 0.999
BF16_PROB_TOLERANCE = 0.05


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * np.logical_and(a, b).sum() / total


@pytest.fixture(scope="module")
def exported(small_demo, tmp_path_factory):
    from ensemble.deploy.export import export_onnx

    out, _, _ = small_demo
    folder = tmp_path_factory.mktemp("onnx") / "onnx"
    export_onnx(out / "search" / "demo" / "ensemble", folder, log=lambda *_: None)
    return out, folder


def test_onnx_runtime_gives_the_float32_pytorch_engines_masks(exported):
    out, folder = exported
    record = json.loads((folder / ONNX_MANIFEST).read_text())
    ensemble = load_engine(out / "search" / "demo" / "ensemble", "cpu")
    onnx = load_engine(folder, "cpu")
    assert isinstance(onnx, OnnxEnsemble) and len(record["members"]) == len(ensemble.members) >= 2
    assert not any((folder / "models").glob("*.pt"))  # the export holds no PyTorch checkpoint
    slices, _ = index_root(out / "data", "test")
    case_day = slices["case_day"].iloc[0]
    image = volume_from_rows(slices[slices["case_day"] == case_day]).image
    probs_o, masks_o = onnx.predict_scan(image, votes=(votes_o := votes_for(onnx, image.shape)))
    probs_t, masks_t = ensemble.predict_scan(image)
    ensemble.amp = False
    probs_f, masks_f = ensemble.predict_scan(image, votes=(votes_f := votes_for(ensemble, image.shape)))
    assert probs_o.shape == probs_t.shape and masks_o.shape == masks_t.shape and masks_f.any()
    assert np.abs(probs_o.astype(np.float32) - probs_f.astype(np.float32)).max() < FP32_PROB_TOLERANCE
    for c in range(3):
        assert dice(masks_o[c], masks_f[c]) >= FP32_MASK_AGREEMENT, (c, dice(masks_o[c], masks_f[c]))
    assert np.abs(probs_o.astype(np.float32) - probs_t.astype(np.float32)).max() < BF16_PROB_TOLERANCE
    # The review list's votes: the same members' own masks on both engines.
    assert votes_o.members == votes_f.members == len(ensemble.members) and votes_f.counts.any()
    assert (votes_o.counts == votes_f.counts).mean() >= FP32_MASK_AGREEMENT


def test_predict_runtime_onnx_writes_the_submission_without_importing_torch(exported, tmp_path):
    out, folder = exported
    script = ("import sys\nfrom gitseg.cli import main\n"
              f"code = main(['predict', '--ensemble', {str(folder)!r}, '--data', {str(out / 'data')!r}, "
              f"'--out', {str(tmp_path / 'onnx')!r}, '--runtime', 'onnx'])\n"
              "assert 'torch' not in sys.modules, 'the ONNX path imported PyTorch'\nsys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(tmp_path / "onnx" / "submission.csv") as f:
        rows = list(csv.DictReader(f))
    slices, _ = index_root(out / "data", "test")
    assert len(rows) == 3 * len(slices)
    # A folder of checkpoints asked for --runtime onnx, or an export asked for torch: each says what to do.
    with pytest.raises(FileNotFoundError, match="gitseg export"):
        load_engine(out / "search" / "demo" / "ensemble", runtime="onnx")
    with pytest.raises(ValueError, match="--runtime onnx"):
        load_engine(folder, runtime="torch")
