"""MRI artefacts: one definition for the robustness report and for training (`data.artefacts`)."""

import numpy as np
import pytest
import torch
from conftest import tiny_config

from gitseg.config import ConfigError
from gitseg.data.artefacts import ARTEFACTS, SEVERITIES, Artefacts, apply, corrupt
from gitseg.data.cache import Cache
from gitseg.data.dataset import SliceDataset
from gitseg.train import fit

SPACING = (3.0, 1.5, 1.5)


def scan():
    rng = np.random.default_rng(0)
    volume = np.zeros((6, 40, 40), np.float32)
    volume[:, 10:30, 8:32] = 800 + rng.normal(0, 20, (6, 20, 24))
    return volume.astype(np.uint16)


@pytest.mark.parametrize("name", ARTEFACTS)
def test_each_artefact_is_seeded_and_grows_with_severity(name):
    raw = scan()
    base = raw / np.percentile(raw[:, ::2, ::2], 99.5)
    once, again = corrupt(raw, SPACING, name, 2, seed=3), corrupt(raw, SPACING, name, 2, seed=3)
    assert once.shape == raw.shape and once.dtype == np.float32 and once.min() >= 0
    assert np.array_equal(once, again)
    change = [np.abs(corrupt(raw, SPACING, name, s, seed=3) - base).mean() for s in (1, 3)]
    assert 0 < change[0] < change[1], change


def test_training_artefacts_change_the_image_not_the_labels(train_cache):
    cache = Cache(train_cache)
    days = cache.case_days(folds=[1])
    plain = SliceDataset(cache, days, 3, 1)
    always = SliceDataset(cache, days, 3, 1, artefacts=Artefacts(["bias_field", "gaussian_noise"], 1.0))
    never = SliceDataset(cache, days, 3, 1, artefacts=Artefacts(["bias_field", "gaussian_noise"], 0.0))
    torch.manual_seed(0)
    for i in (0, 11):
        image, masks = always[i]
        assert not torch.equal(image, plain[i][0]) and torch.equal(masks, plain[i][1])
        assert torch.equal(never[i][0], plain[i][0])
    torch.manual_seed(5)
    first = always[3][0]
    torch.manual_seed(5)
    assert torch.equal(always[3][0], first)  # seeded by torch's generator, as each epoch's loader is


def test_training_amounts_stay_within_severity_two():
    image = np.full((3, 32, 32), 0.5, np.float32)
    torch.manual_seed(0)
    noisy = [Artefacts(["gaussian_noise"], 1.0)(image, SPACING) for _ in range(20)]
    assert max(float(np.std(n - image)) for n in noisy) <= SEVERITIES["gaussian_noise"][1] * 1.2
    assert np.array_equal(apply(image, SPACING, "lower_resolution", 1.0), image)


def test_fit_trains_with_artefacts_and_refuses_unknown_ones(train_cache, tmp_path):
    cfg = tiny_config(train_cache, tmp_path / "run")
    cfg.data.artefacts, cfg.data.artefact_prob = ["bias_field", "motion", "rician_noise"], 0.5
    best = fit(cfg, log=lambda *_: None)
    assert np.isfinite(best["train_loss"])
    cfg.data.artefacts = ["bias_field", "lens_flare"]
    with pytest.raises(ConfigError, match=r"data.artefacts.*lens_flare.*choose from bias_field"):
        fit(cfg, log=lambda *_: None)
