"""best.json from Tune's result files: the best row, with ties broken toward a kept checkpoint."""

from __future__ import annotations

import json

import optuna

from tl_ray.search.results import export_results
from tl_ray.train.checkpoint import MANIFEST_FILE


def test_a_tie_picks_the_epoch_whose_checkpoint_was_kept(tmp_path):
    study = optuna.create_study(direction="maximize")
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.9))
    kept = tmp_path / "tune_x" / "ckpt_epoch2"
    kept.mkdir(parents=True)
    (kept / MANIFEST_FILE).write_text(json.dumps({"format_version": 1}), encoding="utf-8")
    lines = [
        {"epoch": 1, "val_accuracy": 0.9, "checkpoint_path": str(tmp_path / "deleted"),
         "config": {"optuna_trial": 0, "train.lr": 0.1}, "trial_id": "t0"},
        {"epoch": 2, "val_accuracy": 0.9, "checkpoint_path": str(kept),
         "config": {"optuna_trial": 0, "train.lr": 0.1}, "trial_id": "t0"},
        {"epoch": 3, "val_accuracy": 0.5, "checkpoint_path": str(tmp_path / "deleted3"),
         "config": {"optuna_trial": 0, "train.lr": 0.1}, "trial_id": "t0"},
    ]  # fmt: skip
    trial_dir = tmp_path / "tune_x" / "trial_0"
    trial_dir.mkdir()
    (trial_dir / "result.json").write_text("\n".join(map(json.dumps, lines)), encoding="utf-8")
    best = export_results(tmp_path, study, "val_accuracy", "max", max_epochs=3)
    assert (best["epoch"], best["value"]) == (2, 0.9)
    assert best["model"] == str(tmp_path / "model")
    assert (tmp_path / "model" / MANIFEST_FILE).is_file()


def test_a_conditional_parameter_missing_from_the_first_rows_is_a_column(tmp_path):
    """backbone.lr_decay is sampled only when depth > 0: rows without it come first here."""
    import pyarrow.parquet as pq

    study = optuna.create_study(direction="maximize")
    for value in (0.6, 0.8):
        study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=value))
    lines = [
        {"epoch": 1, "val_accuracy": 0.6, "config": {"optuna_trial": 0, "backbone.unfreeze_depth": 0},
         "trial_id": "t0"},
        {"epoch": 1, "val_accuracy": 0.8, "trial_id": "t1",
         "config": {"optuna_trial": 1, "backbone.unfreeze_depth": 2, "backbone.lr_decay": 0.9}},
    ]  # fmt: skip
    (tmp_path / "epochs.jsonl").write_text("\n".join(map(json.dumps, lines)), encoding="utf-8")
    best = export_results(tmp_path, study, "val_accuracy", "max", max_epochs=1)
    assert best["params"] == {"backbone.unfreeze_depth": 2, "backbone.lr_decay": 0.9}
    rows = pq.read_table(tmp_path / "trials.parquet").to_pylist()
    assert [r["param.backbone.lr_decay"] for r in rows] == [None, 0.9]
