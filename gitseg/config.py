"""Typed experiment configuration: dataclasses loaded from YAML with strict validation.

Unknown keys and wrong types are errors that name the key. Overrides come as dotted
`key=value` strings (`train.lr=3e-4`, values parsed as YAML). The resolved config is written
next to every run and stored in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config value is missing, unknown or of the wrong type; the message names the key."""


@dataclasses.dataclass
class DataConfig:
    cache: str = "runs/demo/cache"  # prepared cache folder (gitseg prepare --out)
    fold: int = 0                   # validation fold; the other folds train (the holdout never)
    channels: int = 3               # 2.5D window: odd number of slices stacked as input channels
    stride: int = 2                 # slices between window members (neighbouring 3 mm slices are alike)
    augment: float = 1.0            # augmentation strength, 0 = none
    num_workers: int = 0            # DataLoader worker processes per training process
    artefacts: list[str] = dataclasses.field(default_factory=list)  # MRI artefacts to train with
                                    # (gitseg.data.artefacts: bias_field, gaussian_noise, motion, ...)
    artefact_prob: float = 0.2      # the chance of each listed artefact per training sample
    teacher: str | None = None      # teacher folder (gitseg distill): soft targets for every training
                                    # case-day, and pseudo-labelled unlabelled case-days (gitseg.teacher)


@dataclasses.dataclass
class ModelConfig:
    arch: str = "Unet"                   # a segmentation-models-pytorch architecture
    encoder: str = "resnet18"            # an smp encoder name or tu-<timm model>
    encoder_weights: str | None = None   # None: random; a named weight set (downloads); or a local file
    gate: bool = False                   # auxiliary classification head predicting organ presence per slice
    head_prior: float | None = 0.01      # initial foreground probability of the mask head; None: smp's init
    options: dict = dataclasses.field(default_factory=dict)  # more keyword arguments of the smp architecture,
                                         # e.g. {encoder_depth: 4, decoder_channels: [64, 32, 16, 8]}


@dataclasses.dataclass
class LossTerm:
    name: str            # bce, dice, tversky, focal, lovasz, jaccard
    weight: float = 1.0


SCHEDULES = ("cosine", "wsd")  # train.schedule's choices (gitseg.train.lr_at)


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5           # linear warm-up, then the schedule's decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.01
    schedule: str = "cosine"             # SCHEDULES: cosine: decay over the whole run after warm-up; wsd: warm-up,
                                         # constant lr, linear decay over the last decay_fraction of the steps
    decay_fraction: float = 0.2          # wsd only: the share of all steps spent decaying
    ema: float = 0.0                     # >0: validate, checkpoint and predict with an exponential moving
                                         # average of the weights at this decay (warmed up); 0: off
    grad_clip: float = 1.0               # max gradient norm; 0 disables clipping
    amp: bool = True                     # bf16 autocast (CUDA only; ignored on CPU)
    channels_last: bool = True           # memory format; faster on CPU (oneDNN) and GPU (cuDNN) alike
    seed: int = 0
    loss: list[LossTerm] = dataclasses.field(
        default_factory=lambda: [LossTerm("bce", 0.5), LossTerm("dice", 0.5)])
    gate_weight: float = 0.2             # weight of the gate head's BCE when model.gate is on
    threshold: float = 0.5               # probability threshold for validation masks
    max_steps_per_epoch: int | None = None  # cap on optimiser steps per epoch (None: the whole fold)
    val_tta: str = "none"                # TTA set during validation (see gitseg.infer.TTA_SETS)
    val_batch_size: int | None = None    # windows per validation forward (None: 4 on CPU, 32 on GPU)
    precise_bn: int = 0                  # >0: before each validation, recompute BatchNorm statistics over
                                         # this many training batches (BENCHMARKS.md, val_noise); 0: off
    teacher_weight: float = 0.5          # with data.teacher: loss = (1 - w) * loss on the labels
                                         # + w * BCE toward the teacher's probabilities


@dataclasses.dataclass
class Config:
    name: str = "gitseg"
    out: str = "runs/train"              # output folder of this run (checkpoints, metrics, config)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)


# ---------------------------------------------------------------------------------------------


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value, tp, key: str):
    """Check `value` against the annotation `tp`, converting only int → float and '3e-4' → 3e-4."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if value == {} and type(None) in args and any(dataclasses.is_dataclass(a) for a in args):
            return None  # an optional record that files written before it was typed hold as {}
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping with keys {[f.name for f in dataclasses.fields(tp)]}, "
                              f"got {type(value).__name__} {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        if origin is dict:  # dict[str, V]: keys as JSON writes them, each value checked
            _, item = typing.get_args(tp)
            return {k: _coerce(v, item, f"{key}.{k}") for k, v in value.items()}
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def key_of(field: dataclasses.Field) -> str:
    """A field's key in a file: its name, or `metadata["key"]` where the file's key is not a Python
    name (`class`, `selected_at_0.5`)."""
    return field.metadata.get("key", field.name)


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a dict; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    keys = {key_of(f): f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in keys]
    if unknown:
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(prefix + str(k) for k in unknown)}; allowed under "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(keys)}")
    kwargs = {}
    for key, name in keys.items():
        if key in data:
            kwargs[name] = _coerce(data[key], hints[name], prefix + key)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field (e.g. a loss term's name) is missing
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {exc}") from None


def to_dict(cfg) -> dict:
    """A dataclass as plain data, each field under its key (`key_of`)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {key_of(f): to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple) and hasattr(cfg, "_fields"):  # a NamedTuple, as dataclasses.asdict keeps it
        return type(cfg)(*(to_dict(v) for v in cfg))
    if isinstance(cfg, (list, tuple)):
        return type(cfg)(to_dict(v) for v in cfg)
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def get_dotted(data: dict, key: str):
    """`data["a"]["b"]` for the key `a.b`; KeyError(key) when a part is missing."""
    node = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def set_dotted(data: dict, key: str, value) -> None:
    """`data["a"]["b"] = value` for the key `a.b`, creating missing sections."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is not a section")
    node[parts[-1]] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a copy of a nested dict, in order."""
    data = yaml.safe_load(yaml.safe_dump(data))  # deep copy of plain data
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.lr=3e-4)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML "
                              f"({str(exc).splitlines()[0]})") from None
        try:
            set_dotted(data, key.strip(), value)
        except ConfigError as exc:
            raise ConfigError(f"override {exc}") from None
    return data


def read_yaml(path, example: str = "configs/") -> dict:
    """A YAML file whose top level is a mapping; errors say what is wrong and where to look."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config {path} not found; see {example} for examples")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def load_config(path=None, overrides: list[str] | None = None) -> Config:
    """Config from a YAML file (or the defaults when path is None) plus dotted overrides."""
    data = read_yaml(path) if path is not None else {}
    return from_dict(Config, apply_overrides(data, overrides or []))


def save_config(cfg: Config, path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
