"""Config: defaults, overrides, and one-line errors that name the key."""

from __future__ import annotations

import pytest

from tl_ray.config import apply_overrides, load_config, parse_config
from tl_ray.errors import ConfigError


def write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_minimal_config_gets_defaults():
    cfg = parse_config({"data": {"path": "x.csv"}})
    assert cfg.backbone.kind == "hf-text"
    assert cfg.backbone.name_or_path == "minilm"
    assert cfg.train.metric_mode == "max"


def test_shipped_example_parses():
    cfg = load_config("examples/minilm-sentiment.yaml")
    assert cfg.backbone.unfreeze_depth == 2
    assert cfg.data.encoding == "cp1252"


def test_overrides_are_parsed_as_yaml(tmp_path):
    path = write(tmp_path, "data: {path: a.csv}\ntrain: {lr: 1.0e-4}\n")
    cfg = load_config(path, ["train.lr=3e-5", "train.epochs=2", "backbone.mode=lora"])
    assert cfg.train.lr == 3e-5 and cfg.train.epochs == 2 and cfg.backbone.mode == "lora"


def test_override_does_not_mutate_input():
    raw = {"train": {"lr": 1.0}}
    apply_overrides(raw, ["train.lr=2"])
    assert raw == {"train": {"lr": 1.0}}


@pytest.mark.parametrize(
    "text, message",
    [
        ("data: {path: a.csv}\ntrain: {lrr: 0.1}\n", "unknown key 'train.lrr'"),
        ("train: {lr: 0.1}\n", "missing required key 'data'"),
        ("data: {path: a.csv}\ntrain: {lr: -1}\n", "train.lr: Input should be greater than 0 (got -1)"),
        ("data: {path: a.csv}\nbackbone: {kind: resnet}\n", "backbone"),
        ("data: {path: a.csv, validation_split: 0.2, validation_path: b.csv}\n", "not both"),
        ("- just\n- a list\n", "must hold a mapping"),
        ("data: {path: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_configs_fail_with_one_line(tmp_path, text, message):
    with pytest.raises(ConfigError, match=None) as caught:
        load_config(write(tmp_path, text))
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["train.lr"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_a_relative_model_folder_is_made_absolute_for_the_workers(tmp_path, monkeypatch):
    """Ray workers do not run in the driver's working directory."""
    from tl_ray.config import parse_config

    (tmp_path / "models" / "my-bert").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    cfg = parse_config({"data": {"path": "x.csv"}, "backbone": {"name_or_path": "models/my-bert"}})
    assert cfg.backbone.name_or_path == str(tmp_path / "models" / "my-bert")
    hub = parse_config({"data": {"path": "x.csv"}, "backbone": {"name_or_path": "bert-base-uncased"}})
    assert hub.backbone.name_or_path == "bert-base-uncased"
