"""An exported ensemble folder on ONNX Runtime: the same members, weights, windows, TTA and
post-processing as `EnsembleModel`, without PyTorch (`gitseg predict --runtime onnx`).

  <folder>/ensemble.json      the ensemble's manifest, as `gitseg ensemble` wrote it
  <folder>/onnx.json          per member: its ONNX file, checksum, outputs; how it was exported
  <folder>/models/<name>.onnx one per member, dynamic batch, input (N, C, S, S) float32

The arithmetic follows `gitseg.infer.predict_volume_sets` step for step (each view's weighted
member mean, the views' mean, bilinear resizing to the scan, clamping, float16), in float32
throughout where the PyTorch engine may compute in bfloat16 on a CPU that has it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from ensemble.selection.postprocess import PostProcess, apply
from gitseg import records
from gitseg.data.cache import preprocess_volume, window_indices, windows_per_forward
from gitseg.records import ENSEMBLE_MANIFEST, EnsembleManifest, Member

ONNX_MANIFEST = "onnx.json"
ONNX_FORMAT = 1
INPUT, LOGITS, GATE = "image", "logits", "gate"
# The views of each TTA set and how each maps an (N, C, H, W) array (a flip is its own inverse);
# the names and order are gitseg.infer's TTA_SETS.
VIEWS = {"identity": (), "hflip": (-1,), "vflip": (-2,), "hvflip": (-2, -1)}
TTA_SETS = {"none": ("identity",), "hflip": ("identity", "hflip"), "flips": ("identity", "hflip", "vflip", "hvflip")}


@dataclasses.dataclass
class OnnxMember:
    member: str        # the member's file in ensemble.json (models/<name>.pt)
    onnx: str          # its ONNX file, relative to the folder
    sha256: str
    gate: bool         # a second output: gate logits (N, 3)


@dataclasses.dataclass
class OnnxRecord:
    format: int
    opset: int
    exporter: str      # e.g. torch 2.14.1 (dynamo)
    members: list[OnnxMember]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def flip(x: np.ndarray, view: str) -> np.ndarray:
    axes = VIEWS[view]
    return np.flip(x, axis=axes) if axes else x


def sigmoid(x: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)  # no overflow for large logits


def resize_bilinear(p: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """(B, 3, S, S) → (B, 3, out_h, out_w): half-pixel bilinear, torch's align_corners=False."""
    import cv2  # heavy: OpenCV loads only where images are resized

    b, c, h, w = p.shape
    flat = p.reshape(b * c, h, w)
    return np.stack([cv2.resize(s, (out_w, out_h), interpolation=cv2.INTER_LINEAR) for s in flat]).reshape(
        b, c, out_h, out_w)


def onnxruntime():
    try:
        import onnxruntime as ort  # heavy: only this runtime
    except ImportError as error:
        raise ImportError("the ONNX runtime needs ONNX Runtime: pip install 'gitseg[onnx]'") from error
    return ort


def providers_for(device) -> list[str]:
    """CUDA where ONNX Runtime has it and the device asks for it (or none is named), else the CPU."""
    ort = onnxruntime()

    available = ort.get_available_providers()
    wants_gpu = device is None or str(device).startswith("cuda")
    if wants_gpu and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxEnsemble:
    """`EnsembleModel`'s prediction interface (members, tta, post, manifest, predict, predict_scan,
    load_networks) over ONNX Runtime sessions."""

    def __init__(self, folder: Path, manifest: EnsembleManifest, record: OnnxRecord, device=None):
        self.folder, self.manifest, self.record = Path(folder), manifest, record
        self.members: list[Member] = list(manifest.members)
        self.tta = manifest.tta
        self.post = PostProcess.from_dict(manifest.postprocess)
        self.providers = providers_for(device)
        self.device = f"onnxruntime {self.providers[0]}"  # what timings.json and the logs name
        self.onnx = {m.member: m for m in record.members}
        self._sessions: dict[str, object] = {}

    @classmethod
    def load(cls, folder, device=None, verify: bool = True) -> OnnxEnsemble:
        folder = Path(folder)
        manifest = records.load(EnsembleManifest, folder / ENSEMBLE_MANIFEST,
                                "export the ensemble again: `gitseg export --onnx ENSEMBLE_DIR --out DIR`")
        path = folder / ONNX_MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no {ONNX_MANIFEST}: it is not an ONNX export; run `gitseg export "
                                    f"--onnx {folder} --out DIR` and predict with --ensemble DIR --runtime onnx")
        record = records.load(OnnxRecord, path, "export the ensemble again")
        if record.format != ONNX_FORMAT:
            raise ValueError(f"{path} is of format {record.format}; this gitseg reads format {ONNX_FORMAT}")
        model = cls(folder, manifest, record, device)
        for m in model.members:
            entry = model.onnx.get(m.file)
            if entry is None:
                raise ValueError(f"{path} has no ONNX model for member {m.file}; export the ensemble again")
            file = folder / entry.onnx
            if Path(entry.onnx).is_absolute() or ".." in Path(entry.onnx).parts:
                raise ValueError(f"{path}: {entry.onnx!r} is outside the folder; an export names files inside it")
            if not file.is_file():
                raise FileNotFoundError(f"ONNX member {file} is missing; copy the whole exported folder")
            if verify and sha256(file) != entry.sha256:
                raise ValueError(f"ONNX member {file} does not match its checksum in {ONNX_MANIFEST}; the folder was "
                                 f"modified or copied incompletely")
        return model

    @property
    def sizes(self) -> list[int]:
        return sorted({m.size for m in self.members})

    def session(self, member: Member):
        if member.file not in self._sessions:
            ort = onnxruntime()

            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self._sessions[member.file] = ort.InferenceSession(
                str(self.folder / self.onnx[member.file].onnx), options, providers=self.providers)
        return self._sessions[member.file]

    def load_networks(self) -> None:
        for member in self.members:
            self.session(member)

    def _forward(self, member: Member, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        outputs = self.session(member).run(None, {INPUT: batch})
        return outputs[0], (outputs[1] if self.onnx[member.file].gate else None)

    def _group(self, group: list[Member], volume: np.ndarray, channels: int, stride: int, tta: str,
               out_size, votes=None) -> tuple[np.ndarray, np.ndarray | None]:
        """One window group's weighted mean probabilities float16 `(3, D, H, W)` and gates `(3, D)`:
        gitseg.infer.predict_volume_sets for one TTA set (`votes` too)."""
        views = TTA_SETS[tta]
        weights = [m.weight for m in group]
        norm = float(sum(weights))
        depth, size = volume.shape[0], volume.shape[-1]
        out_h, out_w = out_size if out_size is not None else volume.shape[1:]
        windows = window_indices(depth, channels, stride)
        slices = np.asarray(volume, dtype=np.float32)
        probs = np.empty((3, depth, out_h, out_w), dtype=np.float16)
        gates = np.empty((3, depth), dtype=np.float16)
        has_gate = all(self.onnx[m.file].gate for m in group)
        batch_size = windows_per_forward(size, gpu=self.providers[0] == "CUDAExecutionProvider")
        if votes is not None:
            thresholds = votes.thresholds.reshape(1, -1, 1, 1)
            votes.members += len(group)
        for start in range(0, depth, batch_size):
            x = slices[windows[start:start + batch_size]]  # (B, C, S, S)
            batch = np.ascontiguousarray(np.concatenate([flip(x, v) for v in views]))
            total, gate_total = None, None
            for member, weight in zip(group, weights):
                logits, gate_logits = self._forward(member, batch)
                own = [flip(q, v) for v, q in zip(views, np.split(sigmoid(logits), len(views)))]
                if votes is not None:  # this member's mean over the views, resized, thresholded
                    mine = sum(own) / len(views)
                    if (out_h, out_w) != (size, size):
                        mine = resize_bilinear(np.ascontiguousarray(mine, dtype=np.float32), out_h, out_w)
                    votes.add(start, (mine >= thresholds).transpose(1, 0, 2, 3))
                p = [weight * q for q in own]
                total = p if total is None else [t + q for t, q in zip(total, p)]
                if has_gate:
                    g = [weight * q for q in np.split(sigmoid(gate_logits), len(views))]
                    gate_total = g if gate_total is None else [t + q for t, q in zip(gate_total, g)]
            mean = sum(t / norm for t in total) / len(views)  # (B, 3, S, S)
            if (out_h, out_w) != (size, size):
                mean = resize_bilinear(np.ascontiguousarray(mean, dtype=np.float32), out_h, out_w)
            probs[:, start:start + len(x)] = np.clip(mean, 0, 1).transpose(1, 0, 2, 3).astype(np.float16)
            if has_gate:
                gate = sum(t / norm for t in gate_total) / len(views)  # (B, 3)
                gates[:, start:start + len(x)] = np.clip(gate, 0, 1).T.astype(np.float16)
        return probs, gates if has_gate else None

    def predict(self, inputs: dict[int, np.ndarray], out_size, tta: str | None = None,
                members=None, votes=None) -> tuple[np.ndarray, np.ndarray | None]:
        """As `EnsembleModel.predict`: probabilities float32 `(3, D, H, W)` and gates `(3, D)` or None."""
        members = self.members if members is None else members
        tta = self.tta if tta is None else tta
        if tta not in TTA_SETS:
            raise ValueError(f"unknown TTA set {tta!r}; choose one of {', '.join(TTA_SETS)}")
        return combine_groups(members, inputs, lambda group, volume, channels, stride: self._group(
            group, volume, channels, stride, tta, out_size, votes))

    def probs(self, inputs: dict[int, np.ndarray], out_size, tta: str | None = None, members=None,
              votes=None) -> np.ndarray:
        return self.predict(inputs, out_size, tta, members, votes)[0]

    def predict_scan(self, image: np.ndarray, votes=None) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities float16 and masks bool, both `(3, D, H, W)`, for a raw uint16 scan `(D, H, W)`."""
        inputs = {size: preprocess_volume(image, size) for size in self.sizes}
        probs, gate = self.predict(inputs, out_size=image.shape[1:], votes=votes)
        return probs.astype(np.float16), apply(probs, self.post, gate)


RUNTIMES = ("auto", "torch", "onnx")


def combine_groups(members: list[Member], inputs: dict[int, np.ndarray], predict_group):
    """Both engines' ensemble average: members sharing an input size and 2.5D window run together
    (`predict_group(group, volume, channels, stride)` -> (probabilities float16 `(3, D, H, W)`, gates
    `(3, D)` or None), each group's weighted mean), then the groups weighted by their members' total
    weight. Returns probabilities float32 and gates float32, None unless every member has a gate head."""
    groups: dict[tuple, list[Member]] = {}
    for m in members:
        groups.setdefault((m.size, m.channels, m.stride), []).append(m)
    total, gate_total, weight_sum = None, 0.0, 0.0
    for (size, channels, stride), group in groups.items():
        if size not in inputs:
            raise ValueError(f"no input at {size} px for members {[m.file for m in group]}")
        weight = sum(m.weight for m in group)
        probs, gate = predict_group(group, inputs[size], channels, stride)
        p = probs.astype(np.float32) * weight
        total = p if total is None else total + p
        gate_total = None if gate is None or gate_total is None else gate_total + gate.astype(np.float32) * weight
        weight_sum += weight
    return total / weight_sum, None if gate_total is None else gate_total / weight_sum


def load_engine(folder, device=None, runtime: str = "auto"):
    """The ensemble folder's predictor: `EnsembleModel` (PyTorch) or `OnnxEnsemble` (ONNX Runtime, for
    a folder of `gitseg export --onnx`); auto: ONNX Runtime where the folder is such an export."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    exported = (Path(folder) / ONNX_MANIFEST).is_file()
    if runtime == "onnx" or (runtime == "auto" and exported):
        return OnnxEnsemble.load(folder, device)
    if exported:
        raise ValueError(f"{folder} is an ONNX export (it holds {ONNX_MANIFEST}, not the PyTorch checkpoints): "
                         f"predict it with --runtime onnx, or give the ensemble folder it was exported from")
    from ensemble.model import EnsembleModel  # heavy: PyTorch

    return EnsembleModel.load(folder, device)


def write_record(folder: Path, record: OnnxRecord) -> None:
    (folder / ONNX_MANIFEST).write_text(json.dumps(dataclasses.asdict(record), indent=1))
