"""A self-contained ensemble folder: manifest + copied fold checkpoints, and the model it loads into.

  <ensemble>/ensemble.json         members and weights, TTA, post-processing, preprocessing,
                                   metric convention, scores
  <ensemble>/models/<name>.pt      the members' checkpoints (flat gitseg schema)

Copying the folder is enough to predict elsewhere: paths in the manifest are relative to it and
each checkpoint carries its own config and preprocessing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ensemble.deploy.runtime import combine_groups, sha256
from ensemble.selection.postprocess import PostProcess, apply
from gitseg import records
from gitseg.checkpoint import default_device, load_checkpoint, model_from_checkpoint
from gitseg.data.cache import preprocess_volume
from gitseg.infer import predict_volume_sets, prepare_for_inference
from gitseg.records import ENSEMBLE_MANIFEST, MANIFEST_FORMAT, EnsembleManifest, Member


def member_from_checkpoint(path: Path, file: str, weight: float, configuration: str) -> Member:
    state = load_checkpoint(path)
    pre = state["preprocessing"]
    return Member(file=file, weight=weight, size=int(pre["size"]), channels=int(pre["channels"]),
                  stride=int(pre["stride"]), configuration=configuration, fold=int(state["fold"]))


class EnsembleModel:
    """Members averaged in probability space (weighted), with TTA, then post-processing."""

    def __init__(self, folder, members: list[Member], tta: str, post: PostProcess, device=None):
        self.folder = Path(folder)  # member files are relative to it
        self.members = list(members)
        self.tta = tta
        self.post = post
        self.device = torch.device(device) if device is not None else default_device()
        self._models: dict[str, torch.nn.Module] = {}
        self.manifest: EnsembleManifest | None = None  # set by `load`
        self._verified: set[str] = set()  # member files whose sha256 `load` checked
        self.amp = True  # bfloat16 on a CPU that has it, float16 on a GPU (gitseg.infer.autocast); False: float32

    @classmethod
    def load(cls, folder, device=None, verify: bool = True) -> "EnsembleModel":
        folder = Path(folder)
        path = folder / ENSEMBLE_MANIFEST
        manifest = records.load(EnsembleManifest, path,
                                f"copy the ensemble folder again, or build it with `gitseg ensemble --run SEARCH_DIR "
                                f"--out {folder}`")
        if manifest.format != MANIFEST_FORMAT:
            raise ValueError(f"{path} is not a gitseg ensemble manifest of format {MANIFEST_FORMAT}")
        model = cls(folder, manifest.members, manifest.tta, PostProcess.from_dict(manifest.postprocess), device)
        model.manifest = manifest
        for m in model.members:
            file = folder / m.file
            # The manifest may come from anyone: it names files inside its folder, nothing else.
            if Path(m.file).is_absolute() or ".." in Path(m.file).parts or \
                    not file.resolve().is_relative_to(folder.resolve()):
                raise ValueError(f"{path}: member file {m.file!r} is outside the ensemble folder; an ensemble "
                                 f"manifest names only files inside its folder (models/<name>.pt)")
            if not file.is_file():
                raise FileNotFoundError(f"ensemble member {file} is missing; copy the whole ensemble folder")
            if verify and m.sha256:
                if sha256(file) != m.sha256:
                    raise ValueError(f"ensemble member {file} does not match its checksum in {ENSEMBLE_MANIFEST}; "
                                     f"the folder was modified or copied incompletely")
                model._verified.add(m.file)
        return model

    @property
    def sizes(self) -> list[int]:
        return sorted({m.size for m in self.members})

    def network(self, member: Member) -> torch.nn.Module:
        """The member's model, rebuilt from its checkpoint and prepared for inference once."""
        if member.file not in self._models:
            # A member whose file matched its sha256 at `load` needs no second check of its weights.
            state = load_checkpoint(self.folder / member.file, check_weights=member.file not in self._verified)
            self._models[member.file] = prepare_for_inference(model_from_checkpoint(state, self.device))
        return self._models[member.file]

    def load_networks(self) -> None:
        """Every member's network, ready for inference (otherwise the first prediction builds them)."""
        for member in self.members:
            self.network(member)

    def probs(self, inputs: dict[int, np.ndarray], out_size, tta: str | None = None, members=None,
              votes=None) -> np.ndarray:
        """Weighted mean probabilities float32 `(3, D, H, W)` at `out_size` (see `predict`)."""
        return self.predict(inputs, out_size, tta, members, votes)[0]

    def predict(self, inputs: dict[int, np.ndarray], out_size, tta: str | None = None,
                members=None, votes=None) -> tuple[np.ndarray, np.ndarray | None]:
        """Weighted mean probabilities float32 `(3, D, H, W)` at `out_size`, and gate probabilities
        float32 `(3, D)` averaged the same way (None unless every member has a gate head).

        `inputs` maps each input size to the preprocessed volume `(D, S, S)`; `members` defaults to
        all (pass a subset for ablations). Members sharing a window are run together. `votes`
        (ensemble.predict.review.Votes) receives every member's own masks from the same passes.
        """
        members = self.members if members is None else members
        tta = self.tta if tta is None else tta

        def run(group, volume, channels, stride):
            probs, gates = predict_volume_sets([self.network(m) for m in group], volume, channels, stride, (tta,),
                                               out_size=out_size, weights=[m.weight for m in group],
                                               device=self.device, amp=self.amp, votes=votes)
            return probs[tta], gates.get(tta)  # no gates when a member has no gate head: then the ensemble has none

        return combine_groups(members, inputs, run)

    def predict_scan(self, image: np.ndarray, votes=None) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities float16 and masks bool, both `(3, D, H, W)`, for a raw uint16 scan `(D, H, W)`;
        `votes` as in `predict`."""
        inputs = {size: preprocess_volume(image, size) for size in self.sizes}
        probs, gate = self.predict(inputs, out_size=image.shape[1:], votes=votes)
        return probs.astype(np.float16), apply(probs, self.post, gate)
