"""A real multi-trial Ray Tune + Optuna search of Ray Train runs on a tiny BERT."""

from __future__ import annotations

import contextlib
import io
import json

import optuna
import pyarrow.parquet as pq
import pytest

from tl_ray.cli.app import main

SPACE = """
metric: val_loss
mode: min
params:
  train.lr: {type: float, low: 1.0e-4, high: 3.0e-2, log: true}
  backbone.unfreeze_depth: {type: int, low: 0, high: 2}
  backbone.lr_decay: {type: float, low: 0.5, high: 1.0, when: {backbone.unfreeze_depth: {gt: 0}}}
"""


def run_cli(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    lines = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    return code, lines


def write_inputs(tmp_path, tiny_bert, sentiment_csv, trials: int):
    (tmp_path / "space.yaml").write_text(SPACE, encoding="utf-8")
    (tmp_path / "run.yaml").write_text(
        f"data: {{path: {sentiment_csv}, validation_split: 0.25}}\n"
        f"backbone: {{kind: hf-text, name_or_path: {tiny_bert}, pooling: mean}}\n"
        "train: {epochs: 3, batch_size: 16, max_length: 32, num_workers: 1}\n"
        f"search: {{trials: {trials}, sampler: tpe, seed: 3, reduction_factor: 2, max_concurrent_trials: 2}}\n"
        f"output: {tmp_path / 'search'}\n",
        encoding="utf-8",
    )
    return tmp_path / "run.yaml", tmp_path / "space.yaml"


@pytest.fixture(scope="module")
def search(ray_session, tiny_bert, sentiment_csv, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("tune")
    config, space = write_inputs(tmp_path, tiny_bert, sentiment_csv, trials=6)
    code, lines = run_cli(["tune", str(config), "--space", str(space)])
    assert code == 0
    return tmp_path / "search", lines[-1]


def test_search_finishes_and_best_json_names_the_best_trial(search):
    folder, best = search
    table = pq.read_table(folder / "trials.parquet").to_pylist()
    assert len({row["trial"] for row in table}) == 6
    best_row = min(table, key=lambda r: r["val_loss"])
    on_disk = json.loads((folder / "best.json").read_text())
    assert on_disk == best
    assert (best["trial"], best["epoch"], best["value"]) == (
        best_row["trial"], best_row["epoch"], best_row["val_loss"]
    )
    assert set(best["params"]) >= {"train.lr", "backbone.unfreeze_depth"}
    assert (folder / "model" / "manifest.json").is_file()


def test_asha_stopped_at_least_one_trial_early(search):
    folder, best = search
    rows = pq.read_table(folder / "trials.parquet").to_pylist()
    epochs = {}
    for row in rows:
        epochs[row["trial"]] = max(epochs.get(row["trial"], 0), row["epoch"])
    assert min(epochs.values()) < 3
    assert best["pruned"] >= 1
    assert {r["status"] for r in rows} <= {"complete", "pruned"}


def test_study_is_in_optuna_storage(search):
    folder, _ = search
    study = optuna.load_study(study_name="tl-ray", storage=f"sqlite:///{folder / 'study.db'}")
    assert len(study.trials) == 6
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    lr_decay_seen = [("backbone.lr_decay" in t.params) == (t.params["backbone.unfreeze_depth"] > 0) for t in study.trials]
    assert all(lr_decay_seen)


def test_report_prints_table_and_writes_plots(search, capsys):
    folder, _ = search
    assert main(["report", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "pruned" in out and "val_loss" in out
    for name in ("optimisation_history.png", "lr_vs_depth.png", "learning_curves.png"):
        assert (folder / name).stat().st_size > 1000


def test_invalid_space_fails_before_any_trial(tmp_path, tiny_bert, sentiment_csv, capsys):
    config, space = write_inputs(tmp_path, tiny_bert, sentiment_csv, trials=2)
    space.write_text(SPACE.replace("high: 2}", "high: 5}"), encoding="utf-8")
    assert main(["tune", str(config), "--space", str(space)]) == 2
    assert "exceeds the backbone's 2 layers" in capsys.readouterr().err
    assert not (tmp_path / "search" / "study.db").exists()
    space.write_text(SPACE.replace("low: 1.0e-4", "low: 0.5"), encoding="utf-8")
    assert main(["tune", str(config), "--space", str(space)]) == 2
    assert "train.lr" in capsys.readouterr().err
