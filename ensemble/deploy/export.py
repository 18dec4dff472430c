"""`gitseg export --onnx ENSEMBLE_DIR --out DIR`: every member of an ensemble folder (or a distilled
student's) as an ONNX model, beside the ensemble's manifest, for `gitseg predict --runtime onnx`
(ensemble/deploy/runtime.py).

Each member is exported as the PyTorch engine runs it (BatchNorm folded into the convolutions,
float32), with a dynamic batch, and checked on ONNX Runtime against PyTorch before the folder is
written: a member whose outputs differ by more than `TOLERANCE` stops the export.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from ensemble.deploy.runtime import (
    GATE,
    INPUT,
    LOGITS,
    ONNX_FORMAT,
    OnnxMember,
    OnnxRecord,
    onnxruntime,
    providers_for,
    sha256,
    write_record,
)
from ensemble.model import EnsembleModel
from gitseg.files import staged_folder
from gitseg.models import split_outputs
from gitseg.progress import say
from gitseg.records import ENSEMBLE_MANIFEST

OPSET = 18
TOLERANCE = 1e-3  # largest |logit difference| between ONNX Runtime and PyTorch (float32) on a random batch


class _Outputs(torch.nn.Module):
    """The member's forward with plain outputs: logits, and gate logits where it has a gate head."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x):
        logits, gate = split_outputs(self.network(x))
        return logits if gate is None else (logits, gate)


def export_member(network: torch.nn.Module, channels: int, size: int, path: Path) -> tuple[bool, float]:
    """Write `network` to `path`; returns (has a gate output, largest |difference| from PyTorch)."""
    ort = onnxruntime()
    wrapper = _Outputs(network.float().to(memory_format=torch.contiguous_format)).eval()
    x = torch.randn(3, channels, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = wrapper(x)
    gate = isinstance(expected, tuple)
    outputs = [LOGITS, GATE] if gate else [LOGITS]
    torch.onnx.export(wrapper, (x,), str(path), input_names=[INPUT], output_names=outputs, opset_version=OPSET,
                      dynamic_axes={name: {0: "batch"} for name in [INPUT, *outputs]}, dynamo=False)
    session = ort.InferenceSession(str(path), providers=providers_for("cpu"))
    got = session.run(None, {INPUT: x.numpy()})
    expected = expected if gate else (expected,)
    worst = max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected))
    return gate, worst


def export_onnx(ensemble_dir, out, log=say) -> Path:
    """The ONNX export of `ensemble_dir` in `out` (written whole or not at all); returns `out`."""
    ensemble_dir, out = Path(ensemble_dir), Path(out)
    if out.resolve() == ensemble_dir.resolve():
        raise ValueError("--out must be a new folder, not the ensemble folder itself")
    model = EnsembleModel.load(ensemble_dir, device="cpu")
    entries = []
    with staged_folder(out) as staging:
        shutil.copy2(ensemble_dir / ENSEMBLE_MANIFEST, staging / ENSEMBLE_MANIFEST)
        (staging / "models").mkdir()
        for i, member in enumerate(model.members, 1):
            relative = Path("models") / f"{Path(member.file).stem}.onnx"
            gate, worst = export_member(model.network(member), member.channels, member.size, staging / relative)
            if worst > TOLERANCE:
                raise ValueError(f"{member.file}: ONNX Runtime's logits differ from PyTorch's by {worst:.2g} "
                                 f"(more than {TOLERANCE}); this network does not export faithfully")
            entries.append(OnnxMember(member=member.file, onnx=str(relative), sha256=sha256(staging / relative),
                                      gate=gate))
            log(f"export: {i}/{len(model.members)} {member.file} -> {relative} (largest logit difference from "
                f"PyTorch {worst:.1e})")
        write_record(staging, OnnxRecord(format=ONNX_FORMAT, opset=OPSET, exporter=f"torch {torch.__version__}",
                                         members=entries))
    log(f"export: {out} ({len(entries)} ONNX models); predict with `gitseg predict --ensemble {out} "
        f"--runtime onnx ...`")
    return out
