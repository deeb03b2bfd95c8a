"""`search.cv_folds`: stratified folds, and a real search whose trials score the folds' mean."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import make_sentiment_rows, run_cli, write_csv
from tl_ray.data import LabelMap
from tl_ray.errors import DataError
from tl_ray.labels import Datasets
from tl_ray.search.folds import check_folds, fold_datasets, fold_of, mean_of_folds

SPACE = """
metric: val_accuracy
mode: max
params:
  train.lr: {type: float, low: 1.0e-3, high: 3.0e-2, log: true}
"""


def test_folds_are_stratified_disjoint_covering_and_seeded():
    labels = np.array([0] * 23 + [1] * 11 + [2] * 7)
    folds = fold_of(labels, k=4, seed=5)
    assert sorted(set(folds.tolist())) == [0, 1, 2, 3]  # every row in exactly one fold
    for label in (0, 1, 2):
        counts = np.bincount(folds[labels == label], minlength=4)
        assert counts.max() - counts.min() <= 1, (label, counts)
    sizes = np.bincount(folds)
    assert sizes.max() - sizes.min() <= 1, sizes  # the labels' remainders go to different folds
    assert (fold_of(labels, k=4, seed=5) == folds).all()
    assert not (fold_of(labels, k=4, seed=6) == folds).all()


def _datasets(counts: dict[str, int]) -> Datasets:
    labels = [i for i, n in enumerate(counts.values()) for _ in range(n)]
    table = pa.table({"text": [f"t{i}" for i in range(len(labels))], "label": pa.array(labels, pa.int64())})
    return Datasets(train=table.slice(0, len(labels) - 2), validation=table.slice(len(labels) - 2),
                    labels=LabelMap(tuple(counts)))  # fmt: skip


def test_fold_splits_pool_training_and_validation_rows():
    datasets = _datasets({"neg": 6, "pos": 6})
    splits = fold_datasets(datasets, 3, seed=0)
    validated = sorted(t for split in splits for t in split.validation.column("text").to_pylist())
    assert validated == sorted(f"t{i}" for i in range(12))  # each row validates once
    for split in splits:
        assert split.train.num_rows == 8 and split.validation.num_rows == 4
        assert not set(split.train.column("text").to_pylist()) & set(split.validation.column("text").to_pylist())


def test_more_folds_than_a_class_has_rows_is_one_line():
    with pytest.raises(DataError, match=r"class 'pos' has only 3 labeled rows") as error:
        check_folds(_datasets({"neg": 9, "pos": 3}), 4)
    assert "\n" not in str(error.value)
    check_folds(_datasets({"neg": 9, "pos": 3}), 3)


def test_mean_of_folds_averages_numbers_and_reports_the_spread():
    merged = mean_of_folds([{"epoch": 2, "val_accuracy": 0.5, "node_id": "a", "checkpoint_path": "/f0"},
                            {"epoch": 2, "val_accuracy": 0.7, "node_id": "b", "checkpoint_path": "/f1"}])
    assert merged["val_accuracy"] == pytest.approx(0.6) and merged["val_accuracy_std"] == pytest.approx(0.1)
    assert (merged["epoch"], merged["node_id"], merged["checkpoint_path"], merged["cv_folds"]) == (2, "a", "/f0", 2)


def _inputs(tmp_path, tiny_vectors, folds: int, workers: int = 1, rows: int = 96):
    data = write_csv(tmp_path / "data.csv", make_sentiment_rows(rows))
    (tmp_path / "space.yaml").write_text(SPACE, encoding="utf-8")
    (tmp_path / "run.yaml").write_text(
        f"data: {{path: {data}, validation_split: 0.25}}\n"
        f"backbone: {{kind: word-vectors, vectors: {tiny_vectors}, unfreeze_depth: 1}}\n"
        f"train: {{epochs: 2, batch_size: 16, max_length: 16, num_workers: {workers}}}\n"
        f"search: {{trials: 2, sampler: random, seed: 3, max_concurrent_trials: 2, cv_folds: {folds}}}\n"
        f"output: {tmp_path / 'search'}\n",
        encoding="utf-8",
    )
    return ["tune", tmp_path / "run.yaml", "--space", tmp_path / "space.yaml"]


def test_a_cross_validated_search_scores_each_trial_by_its_folds_mean(ray_session, tiny_vectors, tmp_path, capsys):
    code, lines = run_cli(_inputs(tmp_path, tiny_vectors, folds=2))
    assert code == 0, capsys.readouterr().err[-3000:]
    err = capsys.readouterr().err
    assert "2-fold cross-validation (each trial trains 2 models)" in err and " ± " in err
    folder = tmp_path / "search"
    rows = pq.read_table(folder / "trials.parquet").to_pylist()
    assert sorted((r["trial"], r["epoch"]) for r in rows) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    for row in rows:
        run = f"optuna_{row['trial']}"
        folds = [json.loads((folder / "trials" / run / f"fold-{j}" / "fold_epochs.json").read_text())
                 for j in range(2)]  # fmt: skip
        assert all(sorted(fold) == ["1", "2"] for fold in folds)  # each fold trained every epoch
        per_fold = [fold[str(row["epoch"])] for fold in folds]
        for key in ("val_accuracy", "val_loss", "train_loss"):
            assert row[key] == pytest.approx(statistics.fmean(f[key] for f in per_fold)), key
        assert row["val_accuracy_std"] == pytest.approx(statistics.pstdev(f["val_accuracy"] for f in per_fold))
        assert row["checkpoint_path"] == per_fold[0]["checkpoint_path"]  # fold 0's model
    best = json.loads((folder / "best.json").read_text())
    assert best["metrics"]["val_accuracy_std"] is not None and best["model"]


@pytest.mark.parametrize("option, message", [
    ("workers", "search.cv_folds needs in-process trials"),
    ("rows", "class 'neg' has only 3 labeled rows"),
])  # fmt: skip
def test_cross_validation_refusals_come_before_any_trial(tmp_path, tiny_vectors, capsys, option, message):
    argv = _inputs(tmp_path, tiny_vectors, folds=4, workers=2) if option == "workers" else \
        _inputs(tmp_path, tiny_vectors, folds=4, rows=6)  # fmt: skip
    code, _ = run_cli(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "search" / "search.json").exists()  # nothing to resume or trip over


class _Killed(Exception):
    """Stands in for a trial process killed between two folds' epochs."""


def test_a_retried_cross_validated_trial_trains_only_the_folds_epochs_it_lacks(ray_session, tiny_vectors,
                                                                              tmp_path, monkeypatch):  # fmt: skip
    """Killed after fold 0's epoch 2, before fold 1's: the retry trains fold 1's epoch 2 only,
    and reports the same epochs and means an uninterrupted trial does."""
    import ray.tune

    import tl_ray.train.loop as loop
    from tl_ray.config import load_config
    from tl_ray.data import load_datasets
    from tl_ray.search.folds import run_folds_in_trial

    _inputs(tmp_path, tiny_vectors, folds=2)
    cfg = load_config(tmp_path / "run.yaml")
    datasets = load_datasets(cfg.data, seed=cfg.train.seed)
    reports, calls, real_loop = [], [], loop.run_torch_loop
    monkeypatch.setattr(ray.tune, "report", lambda metrics, **_: reports.append(metrics))

    def counted_loop(config, session, kill_at=None):
        calls.append(session.target)
        if len(calls) == kill_at:
            raise _Killed
        return real_loop(config, session)

    def trial(storage, kill_at=None):
        reports.clear(), calls.clear()
        monkeypatch.setattr(loop, "run_torch_loop", lambda c, s: counted_loop(c, s, kill_at))
        run_folds_in_trial(cfg, datasets, storage_path=str(storage), name="optuna_0")
        return list(reports), list(calls)

    straight, straight_calls = trial(tmp_path / "straight")
    assert straight_calls == [1, 1, 2, 2]  # epoch-major: (epoch 1: folds 0, 1), (epoch 2: folds 0, 1)
    with pytest.raises(_Killed):
        trial(tmp_path / "killed", kill_at=4)
    assert [r["epoch"] for r in reports] == [1]  # epoch 2's mean was never reported
    retried, retried_calls = trial(tmp_path / "killed")
    assert retried_calls == [2]  # fold 1's epoch 2; fold 0's and all of epoch 1 were on disk
    assert [r["epoch"] for r in retried] == [1, 2]  # every epoch reported again, for ASHA and the log
    for ours, theirs in zip(retried, straight):
        for key in ("val_loss", "val_accuracy", "val_accuracy_std", "train_loss"):
            assert ours[key] == pytest.approx(theirs[key], abs=1e-6), (ours["epoch"], key)
