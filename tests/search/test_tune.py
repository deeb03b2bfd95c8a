"""A real multi-trial Ray Tune + Optuna search of Ray Train runs on a tiny BERT."""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pyarrow.parquet as pq
import pytest

from helpers import make_sentiment_rows, run_cli, write_csv
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


def write_inputs(tmp_path, tiny_bert, sentiment_csv, trials: int, batch_size: int = 16, early_stopping: bool = True):
    (tmp_path / "space.yaml").write_text(SPACE, encoding="utf-8")
    (tmp_path / "run.yaml").write_text(
        f"data: {{path: {sentiment_csv}, validation_split: 0.25}}\n"
        f"backbone: {{kind: hf-text, name_or_path: {tiny_bert}, pooling: mean}}\n"
        f"train: {{epochs: 3, batch_size: {batch_size}, max_length: 32, num_workers: 1}}\n"
        f"search: {{trials: {trials}, sampler: tpe, seed: 3, reduction_factor: 2, max_concurrent_trials: 2,"
        f" early_stopping: {str(early_stopping).lower()}}}\n"
        f"output: {tmp_path / 'search'}\n",
        encoding="utf-8",
    )
    return tmp_path / "run.yaml", tmp_path / "space.yaml"


def complete_trials(folder) -> dict[int, float | None]:
    """Finished trials (COMPLETE with their value, or PRUNED: None), read without writing:
    optuna.load_study would race the search process creating the schema (both insert
    alembic_version)."""
    path = folder / "study.db"
    if not path.exists():
        return {}
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            rows = db.execute(
                "SELECT t.number, v.value FROM trials t LEFT JOIN trial_values v ON v.trial_id = t.trial_id"
                " WHERE t.state IN ('COMPLETE', 'PRUNED')"
            ).fetchall()
    except sqlite3.OperationalError:  # tables not created yet, or the file is locked
        return {}
    return dict(rows)


def part_way_trials(folder) -> set[int]:
    """RUNNING trials that already reported an epoch (Optuna intermediate values), read-only."""
    path = folder / "study.db"
    if not path.exists():
        return set()
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            rows = db.execute(
                "SELECT DISTINCT t.number FROM trials t JOIN trial_intermediate_values v"
                " ON v.trial_id = t.trial_id WHERE t.state = 'RUNNING'"
            ).fetchall()
    except sqlite3.OperationalError:
        return set()
    return {number for (number,) in rows}


def study_of(folder) -> optuna.Study:
    name = json.loads((folder / "search.json").read_text())["study"]
    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'study.db'}")


@pytest.fixture(scope="module")
def search(ray_session, tiny_bert, tmp_path_factory):
    """A 5-trial search whose driver is SIGKILLed (no handler runs) once a trial finished and
    another is part-way through, then resumed with `tl-ray tune --resume`."""
    tmp_path = tmp_path_factory.mktemp("tune")
    # In-process trials of the tiny BERT: epochs of about 2 s, long enough to kill in.
    data = write_csv(tmp_path / "data.csv", make_sentiment_rows(1440))
    config, space = write_inputs(tmp_path, tiny_bert, data, trials=TRIALS, batch_size=8)
    folder = tmp_path / "search"
    first = subprocess.Popen(
        [sys.executable, "-m", "tl_ray", "tune", str(config), "--space", str(space)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )

    deadline = time.monotonic() + 600
    while first.poll() is None and time.monotonic() < deadline:
        if complete_trials(folder) and part_way_trials(folder):
            break
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    before = complete_trials(folder)
    assert 1 <= len(before) < TRIALS, "the search finished before a trial was part-way"
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
    study = study_of(folder)
    sampled = [tuple(sorted(t.params.items())) for t in study.trials if t.state.name != "FAIL"]
    assert len(set(sampled)) == len(sampled)  # the resumed sampler continued, it did not replay


def test_an_interrupted_trial_continues_from_its_last_checkpoint(search):
    """Optuna's heartbeat found the killed driver's trials; each was retried with its
    parameters, and its Train run resumed from the last checkpoint, not from epoch 1."""
    folder, _, _ = search
    study = study_of(folder)
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    retries = [t for t in study.trials if t.system_attrs.get("retry_history")]
    assert failed and len(retries) == len(failed)
    assert not [t for t in study.trials if t.state.name in ("RUNNING", "WAITING")]
    rows = pq.read_table(folder / "trials.parquet").to_pylist()
    assert not [r for r in rows if r["trial"] in {t.number for t in failed}]  # carried on by retries
    first_launch = sorted(p.name for p in folder.glob("tune_*"))[0]
    # A resumed run first re-reports the epoch it resumed from (its row then belongs to the
    # later launch; ASHA may stop the trial right there); every report of it names that epoch
    # in `resumed_from_epoch`.
    resumed_from = {}
    for line in (folder / "epochs.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the killed driver's torn last line
            continue
        if record.get("launch") not in (None, first_launch) and record.get("resumed_from_epoch"):
            trial = int(record["config"]["optuna_trial"])
            resumed_from[trial] = max(resumed_from.get(trial, 0), record["resumed_from_epoch"])
    resumed_at = []
    for retry in retries:
        original = study.trials[retry.system_attrs["retry_history"][0]]
        assert retry.params == original.params or not original.params  # killed before sampling: fresh
        epochs = [r["epoch"] for r in rows if r["trial"] == retry.number]
        assert epochs == sorted(set(epochs))  # no epoch written twice
        before = [r["epoch"] for r in rows if r["trial"] == retry.number and r["launch"] == first_launch]
        after = [r["epoch"] for r in rows if r["trial"] == retry.number and r["launch"] != first_launch]
        assert not before or min(after) > max(before)
        if retry.number in resumed_from:
            assert min(after) <= resumed_from[retry.number] + 1  # trained on from there
            resumed_at.append(resumed_from[retry.number])
    assert resumed_at, "no retried trial continued from a checkpoint"
    print(json.dumps({"drill": "tune-driver-sigkill", "trials_kept": len(search[2]), "trials_retried": len(retries),
                      "resumed_from_epochs": sorted(resumed_at)}))  # fmt: skip


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
    # The space ranks by val_loss and keep_checkpoints is 1: the winning epoch's checkpoint
    # was kept, and it (not a stale folder) is the exported model.
    assert best["model"] == str(folder / "model")
    exported = json.loads((folder / "model" / "manifest.json").read_text())
    assert exported["epoch"] == best["epoch"]
    assert exported["metrics"]["val_loss"] == pytest.approx(best["value"])


def test_every_trial_keeps_its_best_epoch_under_the_space_metric(search):
    """Trials rank checkpoints by the space's metric (val_loss), not train.metric's default."""
    folder, _, _ = search
    rows = [r for r in pq.read_table(folder / "trials.parquet").to_pylist() if r["status"] != "interrupted"]
    by_trial: dict[int, list[dict]] = {}
    for row in rows:
        by_trial.setdefault(row["trial"], []).append(row)
    for trial, trial_rows in by_trial.items():
        best_row = min(trial_rows, key=lambda r: (r["val_loss"], -r["epoch"]))
        ties = [r for r in trial_rows if r["val_loss"] == best_row["val_loss"]]
        assert any(Path(r["checkpoint_path"]).is_dir() for r in ties), (trial, trial_rows)


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
    study = study_of(folder)
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") + states.count("PRUNED") == TRIALS
    assert "PRUNED" in states  # ASHA's early stops are PRUNED in the study, not COMPLETE
    # One score per trial: Optuna holds each complete trial's best epoch, as trials.parquet does.
    rows = [r for r in pq.read_table(folder / "trials.parquet").to_pylist() if r["status"] != "interrupted"]
    for trial in study.trials:
        losses = [r["val_loss"] for r in rows if r["trial"] == trial.number]
        if trial.state.name == "COMPLETE":
            assert trial.value == pytest.approx(min(losses))
            assert max(r["epoch"] for r in rows if r["trial"] == trial.number) == 3
        elif trial.state.name == "PRUNED":
            assert max(r["epoch"] for r in rows if r["trial"] == trial.number) < 3
    best = json.loads((folder / "best.json").read_text())
    best_trial = study.trials[best["trial"]]
    if best_trial.state.name == "COMPLETE":
        assert best_trial.value == pytest.approx(best["value"])
    assert all(t.number in {n for r in study.trials for n in r.system_attrs.get("retry_history", [])}
               for t in study.trials if t.state.name == "FAIL")  # failed only by the kill, and retried
    sampled = [t for t in study.trials if t.state.name != "FAIL"]  # one killed right after ask has none
    lr_decay_seen = [("backbone.lr_decay" in t.params) == (t.params["backbone.unfreeze_depth"] > 0) for t in sampled]
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
    study = study_of(folder)
    depths = {t.params["backbone.unfreeze_depth"] for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")}
    cacheable = {d for d in depths if d < 2}  # depth 2 of the tiny BERT's 2 layers: nothing frozen
    built = [json.loads(p.read_text())["boundary"] for p in folder.glob("cache/*/meta.json")]
    assert sorted(built) == sorted({0: "pooled", 1: "layer1"}[d] for d in cacheable)


def test_a_space_sampling_a_per_search_key_fails_before_any_trial(tmp_path, tiny_bert, sentiment_csv, capsys):
    config, space = write_inputs(tmp_path, tiny_bert, sentiment_csv, trials=2)
    space.write_text(SPACE + "  data.validation_split: {type: float, low: 0.1, high: 0.3}\n", encoding="utf-8")
    assert main(["tune", str(config), "--space", str(space)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data.validation_split: cannot be searched"), err
    assert not (tmp_path / "search").exists()
