"""Search-space layer: YAML parsing, validation against a RunConfig, Optuna sampling, overrides."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import optuna
import pytest

from tl_ray.config import apply_overrides, parse_config
from tl_ray.errors import ConfigError
from tl_ray.search.space import (
    SearchSpace,
    flatten,
    load_space,
    parse_space,
    to_overrides,
    validate_against,
)

SHIPPED = Path(__file__).resolve().parents[2] / "search_spaces" / "minilm-sentiment.yaml"
optuna.logging.set_verbosity(optuna.logging.WARNING)


def base(**backbone):
    return parse_config({"data": {"path": "x.csv"}, **({"backbone": backbone} if backbone else {})})


def space_with(**params) -> dict:
    return {"metric": "val_accuracy", "mode": "max", "params": params}


def samples(space: SearchSpace, fixed: dict, n: int = 30, seed: int = 0) -> list[dict]:
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=seed))
    return [space.sample(study.ask(), fixed) for _ in range(n)]


def test_shipped_space_loads_and_validates():
    space = load_space(SHIPPED)
    assert (space.metric, space.mode) == ("val_accuracy", "max")
    assert space.names[:2] == ("train.lr", "backbone.unfreeze_depth")
    lr = space.params[0]
    assert (lr.type, lr.low, lr.high, lr.log) == ("float", 1e-5, 1e-3, True)
    validate_against(space, base(), max_depth=6)
    validate_against(space, base(), max_depth=None)


def test_sampling_stays_in_range_and_honours_conditions():
    space = load_space(SHIPPED)
    specs = {p.name: p for p in space.params}
    drawn = samples(space, flatten(base().model_dump()))
    for s in drawn:
        for name, value in s.items():
            p = specs[name]
            if p.choices is not None:
                assert value in p.choices
            else:
                assert p.low <= value <= p.high
                assert isinstance(value, int if p.type == "int" else float)
                if p.log:
                    assert value > 0
        assert ("backbone.lr_decay" in s) == (s["backbone.unfreeze_depth"] > 0)
        assert "backbone.lora_rank" not in s  # base mode is finetune
    assert any("backbone.lr_decay" in s for s in drawn)
    lora = samples(space, flatten(base(mode="lora").model_dump()))
    assert all(4 <= s["backbone.lora_rank"] <= 32 for s in lora)


def test_same_seed_same_samples_and_other_seed_differs():
    space = load_space(SHIPPED)
    fixed = flatten(base().model_dump())
    assert samples(space, fixed, 10) == samples(space, fixed, 10)
    assert samples(space, fixed, 10) != samples(space, fixed, 10, seed=1)


def test_condition_on_earlier_param_and_skipped_parent():
    space = parse_space(space_with(**{
        "backbone.mode": {"type": "categorical", "choices": ["finetune", "lora"]},
        "backbone.lora_rank": {"type": "int", "low": 4, "high": 8,
                               "when": {"backbone.mode": {"in": ["lora"]}}},
        "backbone.lora_alpha": {"type": "int", "low": 8, "high": 16,
                                "when": {"backbone.lora_rank": {"ge": 4}}},
    }))
    validate_against(space, base(), max_depth=6)
    for s in samples(space, {}, 20):
        assert ("backbone.lora_rank" in s) == (s["backbone.mode"] == "lora")
        assert ("backbone.lora_alpha" in s) == ("backbone.lora_rank" in s)


def test_ordering_against_null_is_false_and_missing_reference_raises():
    space = load_space(SHIPPED).without(["backbone.unfreeze_depth"])
    fixed = flatten(base().model_dump())  # unfreeze_depth is None by default
    assert all("backbone.lr_decay" not in s for s in samples(space, fixed, 5))
    with pytest.raises(ConfigError, match="backbone.lr_decay: `when` refers to backbone.unfreeze_depth"):
        samples(space, {}, 1)
    with pytest.raises(ConfigError, match="backbone.lora_rank: `when` refers to backbone.mode"):
        samples(load_space(SHIPPED), {}, 1)


def test_overrides_round_trip_exactly():
    space = load_space(SHIPPED)
    for s in samples(space, flatten(base(mode="lora").model_dump())):
        raw = apply_overrides({}, to_overrides(s))
        assert flatten(raw) == s
        cfg = parse_config(apply_overrides(base().model_dump(), to_overrides(s)))
        assert cfg.train.lr == s["train.lr"]
    tricky = {"train.lr": 1e-5, "a.b": 0.1 + 0.2, "c": 1e300, "d": "1", "e": None, "f": True,
              "g": "", "h": [16, 32], "i": 5e-324, "j": -0.0, "k": 3}
    back = flatten(apply_overrides({}, to_overrides(tricky)))
    assert back == tricky and all(type(back[k]) is type(v) for k, v in tricky.items())
    assert to_overrides({"train.lr": 1e-4}) == ["train.lr=0.0001"]
    assert math.copysign(1, back["j"]) == -1


def test_flatten_and_without():
    assert flatten({"a": {"b": 1, "c": {"d": None}}, "e": [1]}) == {"a.b": 1, "a.c.d": None, "e": [1]}
    space = load_space(SHIPPED)
    smaller = space.without(["train.lr", "backbone.lora_rank", "not.a.param"])
    assert "train.lr" not in smaller.names and "backbone.lora_rank" not in smaller.names
    assert len(smaller.params) == len(space.params) - 2 and smaller.metric == space.metric
    assert space.without(space.names).params == ()


def test_numeric_strings_are_accepted_and_mode_defaults_from_metric():
    space = parse_space({"metric": "val_loss", "params": {
        "train.lr": {"type": "float", "low": "1e-5", "high": "1e-3", "log": True}}})
    assert space.mode == "min" and space.params[0].low == 1e-5


FLOAT = {"type": "float", "low": 0.1, "high": 0.5}


@pytest.mark.parametrize("spec, message", [
    ({"type": "floaty", "low": 0, "high": 1}, "unknown type 'floaty'"),
    ({"low": 0, "high": 1}, "unknown type None"),
    ({"type": "float", "high": 1.0}, "needs `low` and `high`"),
    ({"type": "int", "low": 1}, "needs `low` and `high`"),
    ({"type": "categorical"}, "needs `choices`"),
    ({"type": "float", "low": 1e-3, "high": 1e-5}, r"`low < high` must hold, but got \(low=0.001, high=1e-05\)"),
    ({"type": "int", "low": 3, "high": 3}, r"`low < high` must hold, but got \(low=3, high=3\)"),
    ({"type": "float", "low": 0.0, "high": 1.0, "log": True}, r"`low > 0` must hold when `log` is true, but got \(low=0.0"),
    ({"type": "int", "low": 0, "high": 6, "log": True}, r"`low > 0` must hold"),
    ({"type": "float", "low": 0.1, "high": 1.0, "log": True, "step": 0.1}, "`step` is not supported when `log` is true"),
    ({**FLOAT, "step": 0}, r"`step > 0` must hold, but got \(step=0.0\)"),
    ({"type": "int", "low": 0, "high": 6, "step": -2}, r"`step > 0` must hold, but got \(step=-2\)"),
    ({"type": "int", "low": 0, "high": 6, "step": 4}, r"`\(high - low\) % step == 0`"),
    ({"type": "int", "low": 0.5, "high": 6}, r"`low` must be an integer, but got \(low=0.5\)"),
    ({"type": "float", "low": "abc", "high": 1}, r"`low` must be a finite number, but got \(low='abc'\)"),
    ({"type": "float", "low": True, "high": 2}, "`low` must be a finite number"),
    ({**FLOAT, "log": "yes"}, r"`log` must be true or false, but got \(log='yes'\)"),
    ({"type": "categorical", "choices": []}, r"`choices` must be a non-empty list, but got \(choices=\[\]\)"),
    ({"type": "categorical", "choices": 16}, "`choices` must be a non-empty list"),
    ({"type": "categorical", "choices": [16, 16]}, "must not repeat"),
    ({"type": "categorical", "choices": [{1: "x"}]}, "each choice must be"),  # lists and string-keyed
    ({"type": "categorical", "choices": [[1, [set()]]]}, "each choice must be"),  # mappings are fine
    ({**FLOAT, "lo": 1}, "unknown key 'lo' for type float"),
    ({"type": "categorical", "choices": [1, 2], "low": 1}, "unknown key 'low' for type categorical"),
    ({**FLOAT, "when": {"train.epochs": {"approx": 3}}}, "unknown `when` operator 'approx'"),
    ({**FLOAT, "when": {"train.epochs": 3}}, "`when.train.epochs` must map operators"),
    ({**FLOAT, "when": ["train.epochs"]}, "`when` must map a path"),
    ({**FLOAT, "when": {"train.epochs": {"in": 3}}}, "`when.train.epochs.in` must be a non-empty list"),
    ({**FLOAT, "when": {"train.epochs": {"gt": "a"}}}, "`when.train.epochs.gt` must be a number"),
    ("0.1", "expected a mapping"),
])
def test_parameter_errors_name_the_parameter(spec, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_space(space_with(**{"train.warmup_ratio": spec}))
    assert str(info.value).startswith("train.warmup_ratio: ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("raw, message", [
    ({"metric": "accuracy", "params": {"train.lr": FLOAT}}, "metric: .*'accuracy'"),
    ({"metric": "val_f1", "mode": "up", "params": {"train.lr": FLOAT}}, "mode: must be max or min, but got 'up'"),
    ({"metric": "val_loss", "mode": "max", "params": {"train.lr": FLOAT}}, "val_loss must be minimised"),
    ({"metric": "val_f1", "params": {}}, "params: must map at least one"),
    ({"metric": "val_f1"}, "params: must map at least one"),
    ({"metric": "val_f1", "params": {"train.lr": FLOAT}, "direction": "max"}, "unknown search space key 'direction'"),
    ({"metric": "val_f1", "params": {"train..lr": FLOAT}}, "'train..lr' is not a dotted config path"),
    (space_with(**{"train.lr": {**FLOAT, "when": {"train.lr": {"gt": 0}}}}), "train.lr: `when` refers to train.lr, which is not sampled before"),
    (space_with(**{"backbone.lr_decay": {**FLOAT, "when": {"backbone.unfreeze_depth": {"gt": 0}}},
                   "backbone.unfreeze_depth": {"type": "int", "low": 0, "high": 6}}),
     "backbone.lr_decay: `when` refers to backbone.unfreeze_depth, which is not sampled before"),
])
def test_space_errors(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_space(raw)


def test_load_errors(tmp_path):
    with pytest.raises(ConfigError, match="search space file not found"):
        load_space(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("params: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_space(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_space(bad)


@pytest.mark.parametrize("params, message", [
    ({"train.lrr": FLOAT}, r"train.lrr: .*unknown key 'train.lrr'"),
    ({"trian.lr": FLOAT}, r"trian.lr: .*unknown key 'trian'"),
    ({"train.warmup_ratio": {"type": "float", "low": 0.5, "high": 1.0}}, r"train.warmup_ratio: 1.0 is not a valid"),
    ({"train.lr": {"type": "float", "low": -1.0, "high": 1.0}}, r"train.lr: -1.0 is not a valid"),
    ({"backbone.mode": {"type": "categorical", "choices": ["finetune", "lroa"]}}, r"backbone.mode: 'lroa' is not a valid"),
    ({"train.batch_size": {"type": "float", "low": 8, "high": 64}}, "train.batch_size: is an integer setting"),
    ({"backbone.unfreeze_depth": {"type": "int", "low": 0, "high": 8}}, r"^backbone.unfreeze_depth: high=8 exceeds the backbone's 6 layers$"),
    ({"backbone.unfreeze_depth": {"type": "categorical", "choices": [2, 7]}}, "backbone.unfreeze_depth: choice=7 exceeds"),
    ({"train.lr": {**FLOAT, "when": {"train.nope": {"eq": 1}}}}, "train.lr: `when` refers to train.nope, which is neither"),
    ({"train.lr": {**FLOAT, "when": {"backbone.mode": {"eq": "lroa"}}}}, r"train.lr: `when` backbone.mode eq 'lroa' is not a valid"),
    ({"train.lr": {**FLOAT, "when": {"backbone.mode": {"in": ["lora", "x"]}}}}, r"train.lr: `when` backbone.mode in 'x'"),
])
def test_validate_against_errors(params, message):
    space = parse_space(space_with(**params))
    with pytest.raises(ConfigError, match=message):
        validate_against(space, base(), max_depth=6)


def test_validate_against_allows_fixed_reference_after_without():
    space = load_space(SHIPPED).without(["backbone.unfreeze_depth"])
    validate_against(space, base(unfreeze_depth=2), max_depth=6)
    assert all("backbone.lr_decay" in s for s in samples(space, flatten(base(unfreeze_depth=2).model_dump()), 5))


def test_validate_against_does_not_mutate_base():
    cfg = base()
    before = copy.deepcopy(cfg.model_dump())
    validate_against(load_space(SHIPPED), cfg, max_depth=6)
    assert cfg.model_dump() == before


def test_to_dict_round_trips_in_order():
    space = load_space(SHIPPED)
    again = parse_space(space.to_dict())
    assert again == space
    assert list(space.to_dict()["params"]) == list(space.names)


@pytest.mark.parametrize(
    "name",
    ["data.validation_split", "data.path", "train.num_workers", "train.cpus_per_worker",
     "train.use_gpu", "train.epochs", "train.metric", "search.trials", "output", "storage_path"],
)  # fmt: skip
def test_per_search_settings_cannot_be_searched(name):
    """Keys read once per search would be ignored (or break the cap) if sampled."""
    spec = {"type": "categorical", "choices": [1, 2]}
    with pytest.raises(ConfigError, match=rf"^{name}: cannot be searched: .*; set it in the run config$"):
        parse_space(space_with(**{name: spec}))


def test_per_trial_settings_that_share_a_prefix_can_be_searched():
    space = parse_space(space_with(**{"train.seed": {"type": "int", "low": 0, "high": 3},
                                      "train.max_length": {"type": "categorical", "choices": [32, 64]}}))
    assert space.names == ("train.seed", "train.max_length")


GRADUAL = {"gradual": {"start": 1, "every": 1, "step": 1}}


def test_schedule_choices_are_sampled_decoded_and_set():
    """A list or mapping choice: Optuna stores its YAML text, the trial gets the value back."""
    space = parse_space(space_with(**{
        "backbone.unfreeze_schedule": {"type": "categorical", "choices": [None, [[1, 0], [3, 2]], GRADUAL]},
        "backbone.lr_decay": {"type": "float", "low": 0.5, "high": 1.0,
                              "when": {"backbone.unfreeze_schedule": {"ne": None}}},
        "train.head_lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    }))  # fmt: skip
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    seen = []
    for _ in range(20):
        trial = study.ask()
        sampled = space.sample(trial, flatten(base().model_dump()))
        schedule = sampled["backbone.unfreeze_schedule"]
        assert schedule in (None, [[1, 0], [3, 2]], GRADUAL)
        assert ("backbone.lr_decay" in sampled) == (schedule is not None)  # `when` sees the value
        stored = trial.params["backbone.unfreeze_schedule"]  # what Tune hands the trial
        assert stored is None or isinstance(stored, str)
        assert space.decode(dict(trial.params)) == sampled
        cfg = parse_config(apply_overrides(base().model_dump(), to_overrides(sampled)))
        assert cfg.backbone.unfreeze_schedule == schedule and cfg.train.head_lr == sampled["train.head_lr"]
        seen.append(json.dumps(schedule))
    assert len(set(seen)) == 3
    assert parse_space(space.to_dict()) == space


def test_schedule_choices_validate_against_the_base_config():
    space = parse_space(space_with(**{
        "backbone.unfreeze_schedule": {"type": "categorical", "choices": [None, [[1, 0], [2, 7]]]}}))
    with pytest.raises(ConfigError, match=r"choice \[\[1, 0\], \[2, 7\]\] has depth 7, which exceeds the "
                                          r"backbone's 6 layers"):
        validate_against(space, base(), max_depth=6)
    late = parse_space(space_with(**{"backbone.unfreeze_schedule": {"type": "categorical",
                                                                    "choices": [[[1, 0], [5, 2]]]}}))
    with pytest.raises(ConfigError, match="past train.epochs"):
        validate_against(late, base(), max_depth=6)


def test_a_fixed_schedule_stays_whole_for_when_conditions():
    cfg = base(unfreeze_schedule=GRADUAL)
    assert flatten(cfg.model_dump())["backbone.unfreeze_schedule"] == GRADUAL
    space = parse_space(space_with(**{"backbone.lr_decay": {
        "type": "float", "low": 0.5, "high": 1.0, "when": {"backbone.unfreeze_schedule": {"eq": GRADUAL}}}}))
    assert "backbone.lr_decay" in samples(space, flatten(cfg.model_dump()), 1)[0]
    assert samples(space, flatten(base().model_dump()), 1)[0] == {}
