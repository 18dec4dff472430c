"""Search spaces as data: YAML → parameters → an Optuna define-by-run function.

A space maps dotted config keys to a distribution:

    model.arch: {choice: [Unet, FPN]}
    model.encoder:                      # conditional: one distribution per value of another key
      when: model.arch
      cases:
        Unet: {choice: [resnet18, mobilenet_v2]}
        FPN: {choice: [resnet18]}
    train.lr: {loguniform: [3.0e-4, 3.0e-3]}
    train.batch_size: {int: [8, 32]}
    train.loss:                          # choices that are not plain values get labels
      choice:
        bce+dice: [{name: bce, weight: 0.5}, {name: dice, weight: 0.5}]
        bce: [{name: bce, weight: 1.0}]

The whole space is validated against the config schema and the model registry before any trial
starts (every architecture × encoder pair is built and run once at the cache size).
"""

from __future__ import annotations

import dataclasses
import itertools

from gitseg.config import Config, ConfigError, apply_overrides, from_dict, get_dotted, set_dotted
from gitseg.data.dataset import window_indices
from gitseg.losses import check_loss_terms
from gitseg.models import build_model, check_input_size, check_model_names, check_parameters_used

KINDS = ("choice", "uniform", "loguniform", "int", "logint")


@dataclasses.dataclass
class Param:
    name: str                 # the Optuna parameter name (key, or key|when=case)
    key: str                  # the dotted config key it sets
    kind: str
    labels: list | None = None    # choice: what Optuna sees (plain values or string labels)
    values: list | None = None    # choice: the config values behind the labels
    low: float | None = None
    high: float | None = None
    when: str | None = None       # conditional on this key ...
    case: object = None           # ... having this value

    def suggest(self, trial):
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, self.labels)
        if self.kind in ("uniform", "loguniform"):
            return trial.suggest_float(self.name, self.low, self.high, log=self.kind == "loguniform")
        return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.kind == "logint")

    def decode(self, suggestion):
        """The config value for what Optuna suggested."""
        if self.kind == "choice":
            return self.values[self.labels.index(suggestion)]
        return suggestion

    def encode(self, value):
        """What Optuna would have suggested for a config value (for the default point)."""
        if self.kind == "choice":
            if value not in self.values:
                raise ConfigError(f"space.{self.key}: the base configuration's value {value!r} is not among "
                                  f"the choices {self.values}")
            return self.labels[self.values.index(value)]
        if not self.low <= value <= self.high:
            raise ConfigError(f"space.{self.key}: the base configuration's value {value!r} is outside "
                              f"[{self.low}, {self.high}]")
        return value

    def active(self, chosen: dict) -> bool:
        return self.when is None or chosen.get(self.when) == self.case


def _plain(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _parse_one(key: str, spec, when=None, case=None) -> Param:
    name = key if when is None else f"{key}|{when}={case}"
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ConfigError(f"space.{key}: expected one of {{{', '.join(k + ': ...' for k in KINDS)}}} "
                          f"or {{when: KEY, cases: {{VALUE: ...}}}}, got {spec!r}")
    kind, arg = next(iter(spec.items()))
    if kind == "choice":
        if isinstance(arg, dict) and arg:
            return Param(name, key, kind, labels=[str(k) for k in arg], values=list(arg.values()), when=when, case=case)
        if isinstance(arg, list) and arg:
            if all(_plain(v) for v in arg):
                return Param(name, key, kind, labels=list(arg), values=list(arg), when=when, case=case)
            return Param(name, key, kind, labels=[str(i) for i in range(len(arg))], values=list(arg),
                         when=when, case=case)
        raise ConfigError(f"space.{key}: choice needs a non-empty list or a mapping label → value")
    if (not isinstance(arg, list) or len(arg) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in arg)):
        raise ConfigError(f"space.{key}: {kind} needs [low, high], got {arg!r}")
    low, high = float(arg[0]), float(arg[1])
    if not low < high:
        raise ConfigError(f"space.{key}: low must be below high, got [{arg[0]}, {arg[1]}]")
    if kind in ("loguniform", "logint") and low <= 0:
        raise ConfigError(f"space.{key}: {kind} needs a positive low bound, got {arg[0]}")
    if kind in ("int", "logint") and not (low.is_integer() and high.is_integer()):
        raise ConfigError(f"space.{key}: int bounds must be integers, got {arg!r}")
    return Param(name, key, kind, low=low, high=high, when=when, case=case)


def parse_space(space: dict) -> list[Param]:
    """Parameters in space order; a conditional parameter must come after the key it depends on."""
    if not isinstance(space, dict) or not space:
        raise ConfigError("space: give at least one key to search, e.g. {train.lr: {loguniform: [1e-4, 1e-2]}}")
    params: list[Param] = []
    seen = set()
    for key, spec in space.items():
        if isinstance(spec, dict) and "when" in spec:
            when = spec["when"]
            if when not in seen:
                raise ConfigError(f"space.{key}: depends on {when!r}, which must be searched and listed before it")
            cases = spec.get("cases")
            if set(spec) != {"when", "cases"} or not isinstance(cases, dict) or not cases:
                raise ConfigError(f"space.{key}: a conditional needs exactly {{when: KEY, cases: {{VALUE: ...}}}}")
            parent = next(p for p in params if p.key == when)
            for case, sub in cases.items():
                if parent.kind == "choice" and case not in parent.values:
                    raise ConfigError(f"space.{key}: case {case!r} is not a choice of {when} ({parent.values})")
                params.append(_parse_one(key, sub, when, case))
        else:
            params.append(_parse_one(key, spec))
        seen.add(key)
    return params


class DefineByRun:
    """The Optuna define-by-run function: suggests each active parameter in order.

    A class, not a closure: Tune pickles the searcher into its experiment state.
    """

    def __init__(self, params: list[Param]):
        self.params = params

    def __call__(self, trial):
        chosen = {}
        for p in self.params:
            if p.active(chosen):
                chosen[p.key] = p.decode(p.suggest(trial))
        return None


def decode(params: list[Param], suggestion: dict) -> dict:
    """Optuna/Tune's {name: suggestion} → {dotted key: config value}."""
    by_name = {p.name: p for p in params}
    unknown = [n for n in suggestion if n not in by_name]
    if unknown:
        raise ConfigError(f"suggested parameters {unknown} are not in the search space")
    return {by_name[n].key: by_name[n].decode(v) for n, v in suggestion.items()}


def encode(params: list[Param], values: dict) -> dict:
    """{dotted key: config value} → the {name: suggestion} point that Optuna would produce."""
    point, chosen = {}, {}
    for p in params:
        if p.active(chosen) and p.key in values:
            point[p.name] = p.encode(values[p.key])
            chosen[p.key] = values[p.key]
    return point


def _get(data: dict, key: str):
    try:
        return get_dotted(data, key)
    except KeyError:
        raise ConfigError(f"space: {key!r} is not a config key") from None


def trial_config(base: dict, values: dict) -> Config:
    """The experiment config of one trial: the base with the trial's values set."""
    data = apply_overrides(base, [])  # a copy
    for key, value in values.items():
        set_dotted(data, key, value)
    return from_dict(Config, data)


def base_values(params: list[Param], base: dict) -> dict:
    """The base configuration's value for every searched key (the default point)."""
    return {p.key: _get(base, p.key) for p in params}


def _values(p: Param) -> list:
    """The values of a parameter worth checking: every choice, or both bounds."""
    if p.kind == "choice":
        return list(p.values)
    cast = int if p.kind in ("int", "logint") else float
    return [cast(p.low), cast(p.high)]


def enumerate_choices(params: list[Param], keys) -> list[dict]:
    """Every combination of the values of `keys` that the conditions allow."""
    keys = [k for k in dict.fromkeys(p.key for p in params) if k in keys]
    options = [[(v, (p.when, p.case) if p.when else None) for p in params if p.key == key for v in _values(p)]
               for key in keys]
    combos = []
    for combo in itertools.product(*options):
        chosen = dict(zip(keys, (v for v, _ in combo)))
        if all(cond is None or chosen.get(cond[0], cond[1]) == cond[1] for _, cond in combo):
            combos.append(chosen)
    return combos


# Keys whose values only make sense together: they decide which network is built and its input.
MODEL_KEYS = ("model.arch", "model.encoder", "model.encoder_weights", "model.gate", "data.channels", "data.stride")


def check_space(params: list[Param], base: dict, cache_size: int) -> int:
    """Check every value against the schema and registries, and every network the space can build.

    Each value is checked on its own against the base config; the model keys are checked jointly
    (every architecture × encoder × window is built and run once at the cache size). Returns the
    number of networks checked. Raises ConfigError naming the key and value before any trial starts.
    """
    for p in params:
        _get(base, p.key)
        for value in _values(p):
            values = {p.key: value, **({p.when: p.case} if p.when else {})}
            try:
                cfg = trial_config(base, values)
            except ConfigError as exc:
                raise ConfigError(f"space: {values} gives an invalid config: {exc}") from None
            check_loss_terms(cfg.train.loss)
    built = set()
    for values in enumerate_choices(params, MODEL_KEYS) or [{}]:
        cfg = trial_config(base, values)
        try:
            window_indices(1, cfg.data.channels, cfg.data.stride)
        except ValueError as exc:
            raise ConfigError(f"space: data.channels/data.stride {cfg.data.channels}/{cfg.data.stride}: "
                              f"{exc}") from None
        model_key = (cfg.model.arch, cfg.model.encoder, cfg.model.gate, cfg.data.channels, str(cfg.model.options))
        if model_key not in built:
            check_model_names(cfg.model)
            model = build_model(cfg.model, cfg.data.channels)
            check_input_size(model, cfg.data.channels, cache_size, cfg.model.arch)
            if cfg.model.options:  # smp's defaults use every parameter; options may not (DDP refuses)
                check_parameters_used(model, cfg.data.channels, min(cache_size, 128), cfg.model)
            built.add(model_key)
    encode(params, base_values(params, base))  # the default point lies inside the space
    return len(built)


def max_epochs(params: list[Param], base: dict) -> int:
    epochs = [p for p in params if p.key == "train.epochs"]
    if not epochs:
        return int(base["train"]["epochs"])
    return int(max(max(p.values) if p.kind == "choice" else p.high for p in epochs))
