import pytest

from gitseg.config import Config, ConfigError, LossTerm, load_config, save_config


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(None, ["train.lr=3e-4", "model.arch=FPN", "train.loss=[{name: focal, weight: 2}]"])
    assert isinstance(cfg, Config)
    assert cfg.train.lr == 3e-4 and cfg.model.arch == "FPN"
    assert cfg.train.loss == [LossTerm("focal", 2.0)]
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_demo_config_loads():
    cfg = load_config("configs/demo.yaml")
    assert cfg.model.encoder_weights is None  # nothing may be downloaded by the demo


@pytest.mark.parametrize("override, message", [
    (["train.lrr=1"], "unknown key train.lrr; allowed under train: epochs"),
    (["nope.x=1"], "unknown key nope"),
    (["train.epochs=ten"], "train.epochs: expected an integer"),
    (["train.epochs=2.5"], "train.epochs: expected an integer"),
    (["train.amp=maybe"], "train.amp: expected true or false"),
    (["train.loss=bce"], "train.loss: expected a list"),
    (["train.loss=[{weight: 1}]"], "train.loss\\[0\\]"),
    (["train.loss=[{name: bce, wieght: 1}]"], "unknown key train.loss\\[0\\].wieght"),
    (["data=3"], "data: expected a mapping"),
    (["train.lr"], "not key=value"),
])
def test_bad_configs_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override)


def test_missing_or_invalid_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="configs/"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
