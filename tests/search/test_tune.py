"""A real multi-trial Ray Tune + Optuna search of Ray Train runs on a tiny BERT."""

from __future__ import annotations

import contextlib
import io
import json
import signal
import sqlite3
import subprocess
import sys
import time

import optuna
import pyarrow.parquet as pq
import pytest

from tl_ray.cli.app import main

TRIALS = 5
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


def complete_trials(folder) -> dict[int, float]:
    """Finished trials, read without writing: optuna.load_study would race the search
    process creating the schema (both insert alembic_version)."""
    path = folder / "study.db"
    if not path.exists():
        return {}
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            rows = db.execute(
                "SELECT t.number, v.value FROM trials t JOIN trial_values v ON v.trial_id = t.trial_id"
                " WHERE t.state = 'COMPLETE'"
            ).fetchall()
    except sqlite3.OperationalError:  # tables not created yet, or the file is locked
        return {}
    return dict(rows)


@pytest.fixture(scope="module")
def search(ray_session, tiny_bert, sentiment_csv, tmp_path_factory):
    """A 5-trial search, interrupted with Ctrl-C after two trials finished, then resumed."""
    tmp_path = tmp_path_factory.mktemp("tune")
    config, space = write_inputs(tmp_path, tiny_bert, sentiment_csv, trials=TRIALS)
    folder = tmp_path / "search"
    first = subprocess.Popen(
        [sys.executable, "-m", "tl_ray", "tune", str(config), "--space", str(space)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600
    while len(complete_trials(folder)) < 2 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(1)
    first.send_signal(signal.SIGINT)
    first.wait(timeout=180)
    before = complete_trials(folder)
    assert 2 <= len(before) < TRIALS
    code, lines = run_cli(["tune", "--resume", str(folder)])
    assert code == 0
    return folder, lines[-1], before


def test_resume_keeps_finished_trials_and_runs_only_the_rest(search):
    folder, best, before = search
    after = complete_trials(folder)
    assert {n: after[n] for n in before} == before  # kept, same values
    launches = sorted(folder.glob("tune_*"))
    assert len(launches) == 2
    resumed_trials = list(launches[1].glob("_trial_*"))
    assert len(resumed_trials) == TRIALS - len(before)
    assert len(after) == TRIALS


def test_search_finishes_and_best_json_names_the_best_trial(search):
    folder, best, _ = search
    table = [r for r in pq.read_table(folder / "trials.parquet").to_pylist() if r["status"] != "interrupted"]
    assert len({row["trial"] for row in table}) == TRIALS
    best_row = min(table, key=lambda r: r["val_loss"])
    on_disk = json.loads((folder / "best.json").read_text())
    assert on_disk == best
    assert (best["trial"], best["epoch"], best["value"]) == (
        best_row["trial"], best_row["epoch"], best_row["val_loss"]
    )
    assert set(best["params"]) >= {"train.lr", "backbone.unfreeze_depth"}
    assert (folder / "model" / "manifest.json").is_file()


def test_asha_stopped_at_least_one_trial_early(search):
    folder, best, _ = search
    rows = [r for r in pq.read_table(folder / "trials.parquet").to_pylist() if r["status"] != "interrupted"]
    epochs = {}
    for row in rows:
        epochs[row["trial"]] = max(epochs.get(row["trial"], 0), row["epoch"])
    assert min(epochs.values()) < 3
    assert best["pruned"] >= 1
    assert {r["status"] for r in rows} <= {"complete", "pruned"}


def test_study_is_in_optuna_storage(search):
    folder, _, _ = search
    study = optuna.load_study(study_name="tl-ray", storage=f"sqlite:///{folder / 'study.db'}")
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == TRIALS
    assert all(t.user_attrs.get("interrupted") for t in study.trials if t.state.name == "FAIL")
    lr_decay_seen = [("backbone.lr_decay" in t.params) == (t.params["backbone.unfreeze_depth"] > 0) for t in study.trials]
    assert all(lr_decay_seen)


def test_report_prints_table_and_writes_plots(search, capsys):
    folder, _, _ = search
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


def test_trials_sharing_a_depth_share_one_feature_cache(search):
    folder, _, _ = search
    study = optuna.load_study(study_name="tl-ray", storage=f"sqlite:///{folder / 'study.db'}")
    depths = {t.params["backbone.unfreeze_depth"] for t in study.trials if t.state.name == "COMPLETE"}
    cacheable = {d for d in depths if d < 2}  # depth 2 of the tiny BERT's 2 layers: nothing frozen
    built = [json.loads(p.read_text())["boundary"] for p in folder.glob("cache/*/meta.json")]
    assert sorted(built) == sorted({0: "pooled", 1: "layer1"}[d] for d in cacheable)
