"""Hyperparameter search spaces: a YAML file, validated up front, sampled define-by-run by Optuna.

File format (keys of `params` are dotted RunConfig paths, so a sampled value is a `--set`)::

    metric: val_accuracy   # val_accuracy | val_f1 | val_loss
    mode: max              # max | min; optional, follows the metric (val_loss -> min)
    params:                # sampled in file order
      train.lr: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
      backbone.unfreeze_depth: {type: int, low: 0, high: 6}
      train.batch_size: {type: categorical, choices: [16, 32]}
      backbone.lr_decay: {type: float, low: 0.7, high: 1.0,
                          when: {backbone.unfreeze_depth: {gt: 0}}}
      backbone.lora_rank: {type: int, low: 4, high: 32, log: true,
                           when: {backbone.mode: {eq: lora}}}

Types and keys follow Optuna: `float` and `int` take low, high, log, step (not log with step);
`categorical` takes choices. A choice may also be a list or mapping (an unfreeze schedule such
as `[[1, 0], [3, 2]]` or `{gradual: {start: 1}}`): Optuna sees it as its YAML text, and the
trial gets the value back (`SearchSpace.decode`). `when: {path: {op: value, ...}, ...}` samples a parameter only if
every comparison holds (ops eq, ne, gt, ge, lt, le, in). `path` is a parameter listed earlier
or a value fixed in the base config; its effective value is the sampled one, else the fixed
one. An ordering comparison (gt/ge/lt/le) against a non-number such as `null` is false, and a
condition on an earlier parameter that was skipped and has no fixed value is false.

Example:
    >>> space = load_space("search_spaces/minilm-sentiment.yaml")
    >>> validate_against(space, base_config, max_depth=6)
    >>> to_overrides(space.sample(trial, fixed=flatten(base_config.model_dump())))
    ['train.lr=0.00012', 'backbone.unfreeze_depth=3', ...]
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, get_args

import yaml

from tl_ray import unfreeze
from tl_ray.config import RunConfig, apply_overrides, parse_config, parse_yaml
from tl_ray.errors import ConfigError, brief, shown
from tl_ray.search.space_values import (
    _check_path, _choice_key, _encode, _number, _plain, _structured, flatten, to_overrides,
)

if TYPE_CHECKING:
    import optuna

__all__ = ["ParamSpec", "SearchSpace", "flatten", "load_space", "parse_space", "to_overrides",
           "validate_against"]

METRICS = {"val_accuracy": "max", "val_f1": "max", "val_loss": "min"}
TYPES = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"},
         "categorical": {"choices"}}
ORDERING = {"gt": operator.gt, "ge": operator.ge, "lt": operator.lt, "le": operator.le}
COMPARE = {"eq": operator.eq, "ne": operator.ne, "in": lambda a, e: a in e, **ORDERING}
OPERATORS = set(COMPARE)
_KEY_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", re.ASCII)


@dataclass(frozen=True)
class ParamSpec:
    """One searchable setting; `name` is its dotted RunConfig path."""

    name: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple | None = None
    when: dict[str, dict[str, Any]] | None = None

    def decode(self, value: Any) -> Any:
        """A choice back from what Optuna stored for it (see `_encode`)."""
        for choice in self.choices or ():
            if _structured(choice) and isinstance(value, str) and _encode(choice) == value:
                return choice
        return value

    def active(self, values: dict[str, Any], space_names: set[str]) -> bool:
        """Whether every `when` comparison holds for the effective values seen so far."""
        for ref, tests in (self.when or {}).items():
            if ref not in values:
                if ref in space_names:
                    return False  # an earlier parameter that was skipped and is not fixed
                raise ConfigError(f"{self.name}: `when` refers to {ref}, which is neither an "
                                  "earlier parameter nor a value of the base config")
            actual = values[ref]
            number = isinstance(actual, (int, float)) and not isinstance(actual, bool)
            for op, expected in tests.items():
                if (op in ORDERING and not number) or not COMPARE[op](actual, expected):
                    return False
        return True


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space: what to optimise and the parameters to sample."""

    metric: str
    mode: str
    params: tuple[ParamSpec, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def sample(self, trial: optuna.Trial, fixed: dict[str, Any] | None = None) -> dict[str, Any]:
        """Suggest each active parameter on `trial` in order; return {dotted_name: value}.

        `fixed` holds flat dotted base-config values (see `flatten`) for `when` conditions.

        >>> space.sample(study.ask(), fixed={"backbone.mode": "finetune"})
        {'train.lr': 0.00031, 'backbone.unfreeze_depth': 0, 'train.batch_size': 16, ...}
        """
        values, sampled, names = dict(fixed or {}), {}, set(self.names)
        for p in self.params:
            if not p.active(values, names):
                continue
            if p.type == "categorical":
                encoded = trial.suggest_categorical(p.name, [_encode(c) for c in p.choices or ()])
                value = p.decode(encoded)
            elif p.type == "int":
                value = trial.suggest_int(p.name, p.low, p.high, step=p.step or 1, log=p.log)
            else:
                value = trial.suggest_float(p.name, p.low, p.high, step=p.step, log=p.log)
            values[p.name] = sampled[p.name] = value
        return sampled

    def decode(self, params: dict[str, Any]) -> dict[str, Any]:
        """Sampled values as Optuna (and so Tune) holds them -> the values to set.

        >>> space.decode({"backbone.unfreeze_schedule": "{gradual: {start: 1}}"})  # doctest: +SKIP
        {'backbone.unfreeze_schedule': {'gradual': {'start': 1}}}
        """
        specs = {p.name: p for p in self.params}
        return {name: specs[name].decode(value) if name in specs else value for name, value in params.items()}

    def to_dict(self) -> dict[str, Any]:
        """The YAML/JSON form that `parse_space` reads back (parameter order kept).

        >>> parse_space(space.to_dict()) == space
        True
        """
        params: dict[str, Any] = {}
        for p in self.params:
            entry: dict[str, Any] = {"type": p.type}
            if p.type == "categorical":
                entry["choices"] = list(p.choices or ())
            else:
                entry.update(low=p.low, high=p.high, log=p.log)
                if p.step is not None:
                    entry["step"] = p.step
            if p.when:
                entry["when"] = {
                    ref: {op: list(v) if isinstance(v, tuple) else v for op, v in tests.items()}
                    for ref, tests in p.when.items()
                }
            params[p.name] = entry
        return {"metric": self.metric, "mode": self.mode, "params": params}

    def without(self, names: Iterable[str]) -> SearchSpace:
        """Drop the parameters the user fixed (names not in the space are ignored).

        The result may have no parameters left; `validate_against` then needs the dropped
        names that later `when`s refer to in the base config, which holds after `--set`.

        >>> space.without(["train.lr"]).names[0]
        'backbone.unfreeze_depth'
        """
        drop = set(names)
        return replace(self, params=tuple(p for p in self.params if p.name not in drop))


def _parse_when(name: str, raw: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{name}: `when` must map a path to comparisons like "
                          f"{{backbone.mode: {{eq: lora}}}}, but got (when={brief(raw)})")
    when: dict[str, dict[str, Any]] = {}
    for ref, tests in raw.items():
        ref = _check_path(ref, f"{name}: `when`")
        if not isinstance(tests, dict) or not tests:
            raise ConfigError(f"{name}: `when.{ref}` must map operators to values like "
                              f"{{eq: lora}}, but got ({ref}={brief(tests)})")
        for op, expected in tests.items():
            if op not in OPERATORS:
                raise ConfigError(f"{name}: unknown `when` operator {brief(op)} for {ref}; use one "
                                  f"of {', '.join(sorted(OPERATORS))}")
            if op == "in" and (not isinstance(expected, list) or not expected):
                raise ConfigError(f"{name}: `when.{ref}.in` must be a non-empty list, but got "
                                  f"(in={brief(expected)})")
            if op in ORDERING and (isinstance(expected, bool)
                                   or not isinstance(expected, (int, float))):
                raise ConfigError(f"{name}: `when.{ref}.{op}` must be a number, but got "
                                  f"({op}={brief(expected)})")
        when[ref] = {op: tuple(v) if op == "in" else v for op, v in tests.items()}
    return when


def _parse_param(name: Any, raw: Any) -> ParamSpec:
    if not isinstance(name, str):
        raise ConfigError(f"params: {brief(name)} is not a dotted config path like train.lr")
    _check_path(name, "params")
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping like {{type: float, low: 0.0, high: 1.0}}, "
                          f"but got {brief(raw)}")
    kind = raw.get("type")
    if not isinstance(kind, str) or kind not in TYPES:
        raise ConfigError(f"{name}: unknown type {brief(kind)}; use one of float, int, categorical")
    extra = sorted(set(raw) - TYPES[kind] - {"type", "when"}, key=str)
    if extra:
        raise ConfigError(f"{name}: unknown key {brief(extra[0])} for type {kind}; allowed: "
                          f"{', '.join(sorted(TYPES[kind] | {'type', 'when'}))}")
    when = _parse_when(name, raw["when"]) if raw.get("when") is not None else None
    if kind == "categorical":
        choices = raw.get("choices")
        if choices is None:
            raise ConfigError(f"{name}: type categorical needs `choices`")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{name}: `choices` must be a non-empty list, but got "
                              f"(choices={brief(choices)})")
        for choice in choices:
            if not _plain(choice):
                raise ConfigError(f"{name}: each choice must be null, a bool, a number, a "
                                  f"string, or a list or mapping of those, but got {brief(choice)}")
            if isinstance(choice, int) and choice.bit_length() > 63:
                raise ConfigError(f"{name}: an integer choice must fit in 64 bits, but got "
                                  f"{brief(choice)}")
        if len({_choice_key(c) for c in choices}) != len(choices):
            raise ConfigError(f"{name}: `choices` must not repeat, but got (choices={brief(choices)})")
        return ParamSpec(name, kind, choices=tuple(choices), when=when)
    integer = kind == "int"
    for key in ("low", "high"):
        if raw.get(key) is None:
            raise ConfigError(f"{name}: type {kind} needs `low` and `high`, but got "
                              f"(low={brief(raw.get('low'))}, high={brief(raw.get('high'))})")
    low, high = (_number(name, k, raw[k], integer) for k in ("low", "high"))
    if low >= high:
        raise ConfigError(f"{name}: `low < high` must hold, but got (low={low}, high={high})")
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{name}: `log` must be true or false, but got (log={brief(log)})")
    step = raw.get("step")
    if step is not None:
        step = _number(name, "step", step, integer)
        if step <= 0:
            raise ConfigError(f"{name}: `step > 0` must hold, but got (step={step})")
        if log:
            raise ConfigError(f"{name}: `step` is not supported when `log` is true, but got "
                              f"(step={step}, log=True)")
        if integer and (high - low) % step:
            raise ConfigError(f"{name}: `(high - low) % step == 0` must hold, but got "
                              f"(low={low}, high={high}, step={step})")
    if log and low <= 0:
        raise ConfigError(f"{name}: `low > 0` must hold when `log` is true, but got "
                          f"(low={low}, high={high})")
    return ParamSpec(name, kind, low=low, high=high, log=log, step=step, when=when)


# Settings read once per search, not per trial: a sampled value would be ignored or would
# break what the search computed from it. Each maps to the reason, shown in the error.
PER_SEARCH = {
    "data.": "the datasets are loaded and split once per search",
    "search.": "it configures the search itself",
    "output": "the search folder is fixed",
    "storage_path": "checkpoint storage is fixed per search",
    "train.num_workers": "the trial concurrency cap is computed from it once",
    "train.cpus_per_worker": "the trial concurrency cap is computed from it once",
    "train.use_gpu": "the trial concurrency cap is computed from it once",
    "train.epochs": "early stopping (ASHA max_t) and trial status are computed from it once",
    "train.metric": "trials keep checkpoints by the space's metric",
}


def _check_searchable(name: Any) -> None:
    """Refuse a parameter naming a per-search setting (see PER_SEARCH).

    >>> _check_searchable("data.validation_split")
    Traceback (most recent call last):
    tl_ray.errors.ConfigError: data.validation_split: cannot be searched: the datasets are loaded and split once per search; set it in the run config
    """
    for key, reason in PER_SEARCH.items():
        if isinstance(name, str) and (name == key or (key.endswith(".") and name.startswith(key))):
            raise ConfigError(f"{name}: cannot be searched: {reason}; set it in the run config")


def parse_space(raw: dict[str, Any]) -> SearchSpace:
    """Validate a parsed YAML mapping into a SearchSpace; the first problem is a ConfigError.

    >>> parse_space({"metric": "val_f1", "params": {"train.lr": {"type": "float",
    ...     "low": 1e-5, "high": 1e-3, "log": True}}}).mode
    'max'
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"a search space must be a mapping with metric/mode/params, got {brief(raw)}")
    extra = sorted(set(raw) - {"metric", "mode", "params"}, key=str)
    if extra:
        raise ConfigError(f"unknown search space key {brief(extra[0])}; allowed: metric, mode, params")
    metric = raw.get("metric")
    if not isinstance(metric, str) or metric not in METRICS:
        raise ConfigError(f"metric: must be one of {', '.join(METRICS)}, but got {brief(metric)}")
    mode = raw.get("mode", METRICS[metric])
    if mode not in ("max", "min"):
        raise ConfigError(f"mode: must be max or min, but got {brief(mode)}")
    if mode != METRICS[metric]:
        raise ConfigError(f"mode: {metric} must be {METRICS[metric]}imised, but got mode={mode}")
    params_raw = raw.get("params")
    if not isinstance(params_raw, dict) or not params_raw:
        raise ConfigError(f"params: must map at least one dotted config path to a parameter, "
                          f"but got {brief(params_raw)}")
    for name in params_raw:
        if not isinstance(name, str) or len(name) > 100 or not _KEY_PATH.fullmatch(name):
            raise ConfigError(f"params: {brief(name)} is not a dotted config path such as train.lr")
        _check_searchable(name)
    params = tuple(_parse_param(n, p) for n, p in params_raw.items())
    order = {p.name: i for i, p in enumerate(params)}
    for i, p in enumerate(params):
        for ref in p.when or {}:
            if order.get(ref, -1) >= i:
                raise ConfigError(f"{p.name}: `when` refers to {shown(ref)}, which is not sampled "
                                  f"before it; list it earlier in params")
    return SearchSpace(metric=metric, mode=mode, params=params)


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a search-space YAML file (see the module docstring for its format).

    >>> load_space("search_spaces/minilm-sentiment.yaml").metric
    'val_accuracy'
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space file not found: {path}")
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping with metric/mode/params keys")
    return parse_space(raw)


def _check_value(base: dict[str, Any], name: str, path: str, value: Any, what: str) -> None:
    try:
        parse_config(apply_overrides(base, to_overrides({path: value})))
    except ConfigError as error:
        raise ConfigError(f"{name}: {what} is not a valid run config setting: {error}") from None


def validate_against(space: SearchSpace, base: RunConfig, max_depth: int | None) -> None:
    """Check every parameter (and `when` path) is a real, in-range setting of `base`.

    `max_depth` is the backbone's layer count, which `backbone.unfreeze_depth` may not exceed.

    >>> validate_against(space, parse_config({"data": {"path": "x.csv"}}), max_depth=6)
    """
    raw, fixed = base.model_dump(), flatten(base.model_dump())
    seen: set[str] = set()
    for p in space.params:
        for value in (p.choices or (p.low, p.high)):
            _check_value(raw, p.name, p.name, value, f"{brief(value)}")
        if p.type == "float" and _integer_field(base, p.name):
            raise ConfigError(f"{p.name}: is an integer setting, so use type: int, "
                              f"but got (type=float)")
        for ref, tests in (p.when or {}).items():
            if ref not in seen and ref not in fixed:
                raise ConfigError(f"{p.name}: `when` refers to {ref}, which is neither an "
                                  "earlier parameter nor a value of the base config")
            for op, expected in tests.items():
                for value in (expected if op == "in" else (expected,) if op in ("eq", "ne")
                              else ()):
                    _check_value(raw, p.name, ref, value, f"`when` {ref} {op} {brief(value)}")
        seen.add(p.name)
        if p.name == "backbone.unfreeze_schedule" and max_depth is not None:
            for choice in p.choices or ():
                deepest = unfreeze.max_depth(choice) if isinstance(choice, list) else 0
                if deepest > max_depth:
                    raise ConfigError(f"{p.name}: choice {brief(choice)} has depth {deepest}, which "
                                      f"exceeds the backbone's {max_depth} layers")
        if p.name == "backbone.unfreeze_depth" and max_depth is not None:
            top = p.high if p.choices is None else max(
                (c for c in p.choices if type(c) is int), default=0)
            if top is not None and top > max_depth:
                label = "high" if p.choices is None else "choice"
                raise ConfigError(f"{p.name}: {label}={top} exceeds the backbone's "
                                  f"{max_depth} layers")


def _integer_field(base: RunConfig, name: str) -> bool:
    *parents, last = name.split(".")
    node: Any = base
    for part in parents:
        node = getattr(node, part, None)
    field = getattr(type(node), "model_fields", {}).get(last)
    kinds = (get_args(field.annotation) or (field.annotation,)) if field else ()
    return int in kinds and float not in kinds
