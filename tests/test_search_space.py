"""Search spaces and search configs: parsing, validation before any trial, Optuna define-by-run."""

import math

import optuna
import pytest
import yaml

from gitseg.config import ConfigError, load_config, to_dict
from search.run import make_searcher
from search.settings import load_search_config
from search.space import DefineByRun, base_values, check_space, decode, encode, parse_space, trial_config

SPACE = {
    "model.arch": {"choice": ["Unet", "FPN"]},
    "model.encoder": {"when": "model.arch", "cases": {"Unet": {"choice": ["tu-test_resnet", "resnet18"]},
                                                       "FPN": {"choice": ["tu-test_resnet"]}}},
    "train.lr": {"loguniform": [1e-4, 1e-2]},
    "train.batch_size": {"int": [4, 16]},
    "train.loss": {"choice": {"bce+dice": [{"name": "bce", "weight": 0.5}, {"name": "dice", "weight": 0.5}],
                              "bce": [{"name": "bce", "weight": 1.0}]}},
}


def base(**overrides):
    cfg = load_config(None, ["model.encoder=tu-test_resnet", "train.lr=0.001", "train.batch_size=8"]
                      + [f"{k}={v}" for k, v in overrides.items()])
    return to_dict(cfg)


def test_define_by_run_respects_conditions():
    params = parse_space(SPACE)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    space = DefineByRun(params)
    seen = set()
    for _ in range(30):
        trial = study.ask()
        space(trial)
        values = decode(params, trial.params)
        if values["model.arch"] == "FPN":
            assert values["model.encoder"] == "tu-test_resnet"
        assert 1e-4 <= values["train.lr"] <= 1e-2 and 4 <= values["train.batch_size"] <= 16
        assert values["train.loss"][0]["name"] == "bce"
        seen.add((values["model.arch"], values["model.encoder"]))
        study.tell(trial, 0.5)
    assert len(seen) == 3


def test_default_point_round_trips():
    params = parse_space(SPACE)
    b = base()
    point = encode(params, base_values(params, b))
    assert point["train.loss"] == "bce+dice" and point["model.encoder|model.arch=Unet"] == "tu-test_resnet"
    cfg = trial_config(b, decode(params, point))
    assert to_dict(cfg) == b


def test_validation_builds_every_model():
    params = parse_space(SPACE)
    assert check_space(params, base(), cache_size=64) == 3


@pytest.mark.parametrize("space, message", [
    ({"model.arch": {"choice": ["Unet", "UNetX"]}}, "unknown architecture 'UNetX'"),
    ({"model.encoder": {"choice": ["resnet19"]}}, "unknown encoder 'resnet19'"),
    ({"train.lrr": {"uniform": [0, 1]}}, "'train.lrr' is not a config key"),
    ({"train.lr": {"loguniform": [0, 1]}}, "positive low bound"),
    ({"train.lr": {"uniform": [1, 0]}}, "low must be below high"),
    ({"train.lr": {"normal": [0, 1]}}, "expected one of"),
    ({"train.epochs": {"choice": ["ten"]}}, "train.epochs: expected an integer"),
    ({"data.channels": {"choice": [3, 4]}}, "must be odd"),
    ({"train.loss": {"choice": [[{"name": "dicee", "weight": 1}]]}}, "unknown loss 'dicee'"),
    ({"model.encoder": {"when": "model.arch", "cases": {"Unet": {"choice": ["resnet18"]}}}}, "must be searched"),
    ({"train.lr": {"uniform": [0.1, 0.2]}}, "value 0.001 is outside"),
])
def test_space_errors_name_the_key(space, message):
    with pytest.raises(ConfigError, match=message):
        check_space(parse_space(space), base(), cache_size=64)


def test_search_config_strict(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "num_sample": 3}))
    with pytest.raises(ConfigError, match="unknown key num_sample"):
        load_search_config(path)
    path.write_text(yaml.safe_dump({"name": "x", "workers": {"num_workers": 0}}))
    with pytest.raises(ConfigError, match="num_workers must be at least 1"):
        load_search_config(path)
    assert load_search_config("configs/search_demo.yaml", ["num_samples=2"]).num_samples == 2
    for override, message in ((["objectives=[score, speed]"], "objectives must be"),
                              (["refit.select=pareto"], "pareto needs objectives"),
                              (["refit.select=best"], "refit.select must be"),
                              (["workers.placement=spread"], "workers.placement must be one of PACK, SPREAD")):
        with pytest.raises(ConfigError, match=message):
            load_search_config("configs/search_demo.yaml", override)


def test_multi_objective_searcher_suggests_from_both_objectives():
    """`objectives: [score, latency]` builds Optuna's multi-objective TPE: it takes the points first,
    then suggests from what it was told about both objectives, and its front is the trade-off."""
    settings = load_search_config("configs/search_demo.yaml", ["objectives=[score, latency]"])
    params = parse_space({"train.lr": {"loguniform": [1e-4, 1e-1]}})
    points = [encode(params, {"train.lr": 1e-3})]
    searcher = make_searcher(settings, params, points)
    seen = []
    for i in range(14):
        config = searcher.suggest(f"t{i}")
        lr = decode(params, config)["train.lr"]
        seen.append(lr)
        # A made-up trade-off: a higher learning rate scores better and "costs" more.
        searcher.on_trial_complete(f"t{i}", {"score": math.log10(lr) + 5, "latency_ms": lr * 100})
    assert seen[0] == pytest.approx(1e-3)  # the point first
    study = searcher._ot_study
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"] and len(study.trials) == 14
    assert len(study.best_trials) == 14  # on this made-up trade-off every trial is Pareto-optimal
    single = make_searcher(load_search_config("configs/search_demo.yaml"), params, points)
    single.suggest("s0")
    assert [d.name for d in single._ot_study.directions] == ["MAXIMIZE"]


def test_shipped_search_configs_parse():
    for path in ("configs/search_demo.yaml", "configs/search_cluster.yaml"):
        settings = load_search_config(path)
        assert parse_space(settings.space)
        load_config(settings.base, settings.set)  # the base with the search's own overrides is a valid config


def test_cluster_configs_validate_against_ray_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    for path in ("cluster.yaml", "configs/cluster_local.yaml"):
        validate_config(prepare_config(yaml.safe_load(open(path))))
    broken = yaml.safe_load(open("cluster.yaml"))
    broken["max_workerz"] = 2
    with pytest.raises(Exception, match="max_workerz"):
        validate_config(prepare_config(broken))


def test_large_space_is_checked_value_by_value():
    # Many keys (their product is millions of combinations) are still checked in full: a bad
    # value among the last choices of the last key is found.
    space = {f"train.{k}": {"uniform": [0.01, 0.9]} for k in ("warmup_epochs", "min_lr_ratio", "gate_weight")}
    space.update({"train.weight_decay": {"loguniform": [1e-6, 1e-2]}, "data.augment": {"choice": [0, 0.5, 1, 1.5]},
                  "train.batch_size": {"choice": [4, 8, 16, 32]}, "data.stride": {"choice": [1, 2, 3]},
                  "train.loss": {"choice": [[{"name": "bce", "weight": 1}], [{"name": "bce", "weight": 1}],
                                            [{"name": "focal", "weight": 1}], [{"name": "lovaszz", "weight": 1}]]}})
    with pytest.raises(ConfigError, match="unknown loss 'lovaszz'"):
        check_space(parse_space(space), base(), cache_size=64)
