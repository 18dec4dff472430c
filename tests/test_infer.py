import numpy as np
import pytest
import torch

from gitseg.config import ModelConfig
from gitseg.data.dataset import window_indices
from gitseg.infer import predict_volume, predict_volume_sets, prepare_for_inference
from gitseg.models import build_model


def manual_tta(model, volume, channels, stride):
    """Slice by slice: predict, predict the flipped window and unflip, average the probabilities."""
    model.eval()
    vol = torch.from_numpy(volume.astype(np.float32))
    out = []
    with torch.no_grad():
        for idx in window_indices(len(volume), channels, stride):
            x = vol[idx][None]
            p = torch.sigmoid(model(x))
            q = torch.sigmoid(model(x.flip(-1))).flip(-1)
            out.append(((p + q) / 2)[0])
    return torch.stack(out, dim=1).numpy()  # (3, D, S, S)


@pytest.fixture(scope="module")
def model_and_volume():
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="tu-test_resnet"), in_channels=3).eval()
    volume = np.random.default_rng(0).random((11, 64, 64)).astype(np.float16)
    return model, volume


def test_fused_tta_equals_manual_flip_average(model_and_volume):
    model, volume = model_and_volume
    probs = predict_volume(model, volume, channels=3, stride=2, tta="hflip", batch_size=4, amp=False)
    assert probs.shape == (3, 11, 64, 64) and probs.dtype == np.float16
    expected = manual_tta(model, volume, 3, 2)
    assert np.abs(probs.astype(np.float32) - expected).max() < 2e-3  # float16 output


def test_maps_back_to_the_original_size_and_weights_models(model_and_volume):
    model, volume = model_and_volume
    probs = predict_volume(model, volume, 3, 1, out_size=(83, 96), tta="none")
    assert probs.shape == (3, 11, 83, 96) and 0 <= probs.min() and probs.max() <= 1
    torch.manual_seed(1)
    other = build_model(ModelConfig(encoder="tu-test_resnet"), in_channels=3).eval()
    a = predict_volume(model, volume, 3, 1, tta="none", amp=False).astype(np.float32)
    b = predict_volume(other, volume, 3, 1, tta="none", amp=False).astype(np.float32)
    mix = predict_volume([model, other], volume, 3, 1, tta="none", weights=[3, 1], amp=False).astype(np.float32)
    assert np.abs(mix - (3 * a + b) / 4).max() < 2e-3


def test_unknown_tta_lists_choices(model_and_volume):
    model, volume = model_and_volume
    with pytest.raises(ValueError, match="choose one of none, hflip, flips"):
        predict_volume(model, volume, 3, 1, tta="rot")


def test_prepared_model_folds_batchnorm_and_leaves_the_original_alone():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="Unet", encoder="resnet18"), in_channels=3)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ready = prepare_for_inference(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in ready.modules())
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(ready(x), model(x), atol=1e-4)
    assert prepare_for_inference(ready) is ready


def test_folding_that_would_change_outputs_is_not_used(monkeypatch):
    from gitseg import infer

    def bad_fold(model):  # pretend a pattern was folded wrongly
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        conv.weight.data.mul_(2)
        return 1

    monkeypatch.setattr(infer, "_fold_pairs", bad_fold)
    model = build_model(ModelConfig(encoder="tu-test_resnet"), in_channels=3).eval()
    ready = prepare_for_inference(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ready(x), model(x), atol=1e-5)


def test_several_tta_sets_and_the_gate_from_one_forward(model_and_volume):
    """predict_volume_sets gives each TTA set what predict_volume gives it alone, and the gate head's
    per-slice probabilities averaged over views and models (none when a model has no gate head)."""
    model, volume = model_and_volume
    probs, gates = predict_volume_sets(model, volume, 3, 2, ("none", "hflip"), amp=False)
    for tta in ("none", "hflip"):
        assert np.array_equal(probs[tta], predict_volume(model, volume, 3, 2, tta=tta, amp=False))
    assert gates == {}
    torch.manual_seed(2)
    gated = build_model(ModelConfig(encoder="tu-test_resnet", gate=True), in_channels=3).eval()
    probs, gates = predict_volume_sets([gated, gated], volume, 3, 2, ("none", "hflip"), amp=False, weights=[1, 3])
    vol = torch.from_numpy(volume.astype(np.float32))
    with torch.no_grad():
        x = vol[torch.from_numpy(window_indices(len(volume), 3, 2))]
        plain = torch.sigmoid(gated(x)[1]).T.numpy()                   # (3, D)
        flipped = torch.sigmoid(gated(x.flip(-1))[1]).T.numpy()
    assert gates["none"].shape == (3, len(volume)) and gates["none"].dtype == np.float16
    assert np.abs(gates["none"].astype(np.float32) - plain).max() < 2e-3
    assert np.abs(gates["hflip"].astype(np.float32) - (plain + flipped) / 2).max() < 2e-3
    _, mixed = predict_volume_sets([gated, model], volume, 3, 2, ("none",), amp=False)
    assert mixed == {}  # one member without a gate head: no gate for the ensemble
