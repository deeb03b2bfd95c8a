"""Bad input through the real `tl-ray` executable: one line on stderr, exit code 2."""

from __future__ import annotations

import pytest
from helpers import run_tl_ray

from tl_ray.cli.app import main


def config(tmp_path, body: str):
    path = tmp_path / "run.yaml"
    path.write_text(body, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    "body, message",
    [
        ("data: {path: missing.csv}\n", "data file not found: missing.csv"),
        ("data: {path: d.csv}\ntrain: {epochs: 0}\n", "train.epochs"),
        ("data: {path: d.csv}\nbackbone: {kind: nope}\n", "backbone"),
        ("data: {path: d.csv, text_column: body}\n", "column 'body' not found"),
        ("data: {path: d.csv}\nbackbone: {name_or_path: ./no-model}\n", "folder not found: ./no-model"),
        ("data: {path: d.csv}\nbackbone: {name_or_path: minilm, unfreeze_depth: 7}\n", "between 0 and 6"),
        ("data: {path: latin.csv}\n", "pass data.encoding"),
    ],
)
def test_train_rejects_bad_input_before_starting_ray(
    tmp_path, sentiment_csv, body, message, monkeypatch, capsys
):
    (tmp_path / "d.csv").write_bytes(sentiment_csv.read_bytes())
    (tmp_path / "latin.csv").write_bytes("text,label\ncaf\xe9 ok,pos\nbad,neg\n".encode("latin-1"))
    monkeypatch.chdir(tmp_path)
    assert main(["train", config(tmp_path, body)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "none.yaml"], "config file not found"),
        (["train", "run.yaml", "--set", "train.lr"], "key.path=value"),
        (["predict", ".", "--text", "hi"], "is not a tl-ray checkpoint"),
        (["predict", "."], "nothing to predict"),
        (["predict", ".", "--input", "missing.txt"], "input file not found"),
        (["evaluate", ".", "--data", "missing.csv"], "data file not found"),
    ],
)
def test_commands_fail_with_one_line(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    config(tmp_path, "data: {path: d.csv}\n")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_the_executable_exits_2_with_one_line(tmp_path):
    result = run_tl_ray("predict", str(tmp_path), "--text", "hi")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path} is not a tl-ray checkpoint: it has no manifest.json"
    ]


def test_debug_shows_the_traceback(tmp_path):
    result = run_tl_ray("--debug", "predict", str(tmp_path), "--text", "x")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_usage_error_is_not_a_traceback(capsys):
    assert main(["train"]) == 2
    assert "Missing argument" in capsys.readouterr().err


def test_serve_refuses_an_experiment_whose_best_model_was_not_kept(tmp_path, capsys):
    """best.json with "model": null must not serve a stale model/ left by an earlier export."""
    import json

    experiment = tmp_path / "experiment"
    (experiment / "model").mkdir(parents=True)
    (experiment / "model" / "manifest.json").write_text(json.dumps({"format_version": 1}), encoding="utf-8")
    best = {"trial": 0, "epoch": 1, "metric": "val_loss", "value": 0.5, "checkpoint": None, "model": None}
    (experiment / "best.json").write_text(json.dumps(best), encoding="utf-8")
    assert main(["serve", str(experiment), "--export-config", str(tmp_path / "serve.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "names no model" in err[0] and "trial 0 epoch 1" in err[0], err
    assert not (tmp_path / "serve.yaml").exists()
