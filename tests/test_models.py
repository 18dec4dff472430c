import pytest
import torch

from gitseg.config import ConfigError, LossTerm, ModelConfig
from gitseg.losses import LOSSES, LossMix
from gitseg.models import ARCHITECTURES, build_model, check_input_size, split_outputs

# PAN's feature pyramid attention pools its 1/16 feature map three times: it needs >= 128 px.
MIN_SIZE = {"PAN": 128}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_builds_and_runs(arch):
    size = MIN_SIZE.get(arch, 64)
    model = build_model(ModelConfig(arch=arch, encoder="tu-test_resnet", gate=True), in_channels=5)
    model.eval()
    with torch.no_grad():
        logits, gate = split_outputs(model(torch.randn(2, 5, size, size)))
    assert logits.shape == (2, 3, size, size) and gate.shape == (2, 3)
    plain = build_model(ModelConfig(arch=arch, encoder="tu-test_resnet"), in_channels=3).eval()
    with torch.no_grad():
        logits, gate = split_outputs(plain(torch.randn(1, 3, size, size)))
    assert logits.shape == (1, 3, size, size) and gate is None


def test_native_smp_encoder_and_input_size_check():
    model = build_model(ModelConfig(arch="Unet", encoder="resnet18"), in_channels=3)
    check_input_size(model, 3, 64, "Unet")
    pan = build_model(ModelConfig(arch="PAN", encoder="tu-test_resnet"), in_channels=3)
    with pytest.raises(ConfigError, match="PAN cannot take 64x64"):
        check_input_size(pan, 3, 64, "PAN")


@pytest.mark.parametrize("cfg, message", [
    (ModelConfig(arch="UNet"), "unknown architecture 'UNet'; choose one of Unet, UnetPlusPlus"),
    (ModelConfig(encoder="resnet19"), "unknown encoder 'resnet19'; choose one of .*resnet18"),
    (ModelConfig(encoder="tu-not_a_model"), "timm has no model 'not_a_model'"),
    (ModelConfig(arch="DPT", encoder="resnet18"), "DPT needs a timm encoder"),
])
def test_unknown_names_list_the_choices(cfg, message):
    with pytest.raises(ConfigError, match=message):
        build_model(cfg, in_channels=3)


def test_local_encoder_weights(tmp_path):
    source = build_model(ModelConfig(encoder="tu-test_resnet"), in_channels=3)
    torch.save(source.encoder.state_dict(), tmp_path / "enc.pt")
    loaded = build_model(ModelConfig(encoder="tu-test_resnet", encoder_weights=str(tmp_path / "enc.pt")), 3)
    for a, b in zip(source.encoder.state_dict().values(), loaded.encoder.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="no file"):
        build_model(ModelConfig(encoder="tu-test_resnet", encoder_weights=str(tmp_path / "missing.pt")), 3)


def test_loss_mix_is_the_weighted_sum():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 16, 16)
    targets = (torch.rand(2, 3, 16, 16) > 0.7).float()
    mix = LossMix([LossTerm("bce", 0.3), LossTerm("dice", 0.7)])
    total, parts = mix(logits, targets)
    single = {name: LossMix([LossTerm(name, 1.0)])(logits, targets)[0] for name in ("bce", "dice")}
    assert total.item() == pytest.approx(0.3 * single["bce"].item() + 0.7 * single["dice"].item(), rel=1e-6)
    assert set(parts) == {"bce", "dice"}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_is_differentiable(name):
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    targets = (torch.rand(2, 3, 8, 8) > 0.5).float()
    total, _ = LossMix([LossTerm(name, 1.0)])(logits, targets)
    total.backward()
    assert torch.isfinite(total) and logits.grad is not None


def test_bad_loss_terms():
    with pytest.raises(ConfigError, match="unknown loss 'dicee'; choose one of bce, dice"):
        LossMix([LossTerm("dicee", 1.0)])
    with pytest.raises(ConfigError, match="at least one term"):
        LossMix([])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_head_prior_starts_every_pixel_near_the_prior(arch):
    size = MIN_SIZE.get(arch, 64)
    model = build_model(ModelConfig(arch=arch, encoder="tu-test_resnet", head_prior=0.01), in_channels=3).eval()
    with torch.no_grad():
        probs = torch.sigmoid(split_outputs(model(torch.randn(2, 3, size, size)))[0])
    # smp's own init starts near 0.5 (most pixels above the 0.5 cut); with the prior nothing is organ yet
    assert 0.005 < probs.mean() < 0.05 and probs.max() < 0.2


@pytest.mark.parametrize("prior", [0.0, 1.0, -0.1])
def test_head_prior_outside_0_1_is_a_config_error(prior):
    with pytest.raises(ConfigError, match="model.head_prior must be in"):
        build_model(ModelConfig(arch="Unet", encoder="tu-test_resnet", head_prior=prior), in_channels=3)


def test_model_options_reach_the_architecture_and_bad_ones_are_named():
    """model.options passes more smp keyword arguments (the real-size rehearsal's CPU-sized model)."""
    small = build_model(ModelConfig(encoder="tu-test_resnet", options={"encoder_depth": 3,
                                                                       "decoder_channels": [16, 8, 4]}), 3)
    assert [m.out_channels for m in small.decoder.modules() if isinstance(m, torch.nn.Conv2d)][-1] == 4
    assert small(torch.zeros(1, 3, 64, 64)).shape == (1, 3, 64, 64)
    with pytest.raises(ConfigError, match="options .*cannot be built"):
        build_model(ModelConfig(encoder="tu-test_resnet", options={"no_such_argument": 1}), 3)
    with pytest.raises(ConfigError, match="in_channels come from"):
        build_model(ModelConfig(encoder="tu-test_resnet", options={"in_channels": 1}), 3)


def test_options_that_leave_parameters_unused_are_refused_before_ddp_does():
    """A timm encoder at encoder_depth 4 builds its last blocks but never uses them: DDP would stop
    the trial with an obscure error; the check names the cause and the fix."""
    from gitseg.models import check_parameters_used

    cfg = ModelConfig(encoder="tu-mobilenetv3_small_050", options={"encoder_depth": 4,
                                                                   "decoder_channels": [32, 16, 8, 8]})
    with pytest.raises(ConfigError, match="parameters unused .*keep encoder_depth at 5"):
        check_parameters_used(build_model(cfg, 3), 3, 64, cfg)
    cfg.options = {"decoder_channels": [32, 16, 16, 8, 8]}
    model = build_model(cfg, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check_parameters_used(model, 3, 64, cfg)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # probed on a copy


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_checkpoint_rebuilds_every_architecture_exactly_without_its_encoder_weights_file(arch):
    """model_from_checkpoint builds on the meta device and takes every tensor from the checkpoint:
    the same outputs as the trained model, nothing left on the meta device, and a config that named
    a local encoder weights file (absent where the model predicts) still rebuilds."""
    from gitseg.checkpoint import model_from_checkpoint
    from gitseg.config import Config, to_dict

    size = MIN_SIZE.get(arch, 64)
    torch.manual_seed(0)
    cfg = Config(model=ModelConfig(arch=arch, encoder="tu-test_resnet", gate=True))
    trained = build_model(cfg.model, in_channels=3).eval()
    for module in trained.modules():  # BatchNorm statistics that differ from a fresh model's
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    cfg.model.encoder_weights = "/nowhere/encoder.pt"
    state = {"config": to_dict(cfg), "model": trained.state_dict(), "preprocessing": {"channels": 3}}
    rebuilt = model_from_checkpoint(state)
    assert not any(t.is_meta for t in [*rebuilt.parameters(), *rebuilt.buffers()])
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        for a, b in zip(split_outputs(trained(x)), split_outputs(rebuilt(x))):
            assert torch.equal(a, b)
