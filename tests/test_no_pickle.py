"""Nothing gitseg reads from a run folder, a cache or a config can run code (issue 18): checkpoints
and encoder weights load with `weights_only`, arrays without pickle, YAML with the safe loader. Each
reader gets a file that would create a marker file if it were unpickled (or YAML-constructed), and
must refuse it with an error naming the file, the marker never made."""

import numpy as np
import pytest
import torch

from gitseg.checkpoint import load_checkpoint
from gitseg.config import ConfigError, ModelConfig, read_yaml
from gitseg.files import CorruptFileError, load_array, load_compressed
from gitseg.models import build_model, load_encoder_weights


class Payload:
    """Unpickling this opens (creates) `marker`: what a hostile file could do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_checkpoint_that_pickles_code_is_refused_unrun(tmp_path):
    path, marker = tmp_path / "best.pt", tmp_path / "ran"
    torch.save({"format": 1, "model": {}, "evil": Payload(marker)}, path)
    with pytest.raises(CorruptFileError, match=r"best.pt is truncated or altered \(torch cannot read it"):
        load_checkpoint(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is real: a plain load runs it
    assert marker.exists()


def test_encoder_weights_that_pickle_code_are_refused_unrun(tmp_path):
    path, marker = tmp_path / "weights.pth", tmp_path / "ran"
    torch.save({"conv.weight": torch.zeros(1), "evil": Payload(marker)}, path)
    model = build_model(ModelConfig(arch="Unet", encoder="tu-test_resnet"), 3)
    with pytest.raises(ConfigError, match=r"model.encoder_weights: torch cannot read .*weights.pth as weights"):
        load_encoder_weights(model, path)
    assert not marker.exists()


def test_arrays_with_pickled_objects_are_refused_unrun(tmp_path):
    marker = tmp_path / "ran"
    hostile = np.array([Payload(marker)], dtype=object)
    np.save(tmp_path / "image.npy", hostile, allow_pickle=True)
    with pytest.raises(CorruptFileError, match=r"image.npy is truncated or altered"):
        load_array(tmp_path / "image.npy", "rebuild it")
    np.savez_compressed(tmp_path / "oof.npz", probs=hostile)
    with pytest.raises(CorruptFileError, match=r"oof.npz is truncated or altered"):
        load_compressed(tmp_path / "oof.npz", "refit it")
    assert not marker.exists()
    # Without the guard these files would run the payload: numpy unpickles when allowed to.
    np.load(tmp_path / "image.npy", allow_pickle=True)
    assert marker.exists()


def test_yaml_that_constructs_python_objects_is_refused_unrun(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "search.yaml"
    path.write_text(f'name: !!python/object/apply:builtins.open ["{marker}", "w"]\n')
    with pytest.raises(ConfigError, match=r"search.yaml is not valid YAML"):
        read_yaml(path)
    assert not marker.exists()
