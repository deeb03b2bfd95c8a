"""Cross-validated trials (`search.cv_folds: k`): each trial's score is the mean over k folds.

The labeled rows (training and validation pooled) are dealt into k stratified folds, the same
for every trial of a search (from `search.seed`). A trial trains k models, epoch by epoch: in
epoch e each fold's loop runs one more epoch from its own checkpoints (TRIALS_DIR/<run>/fold-j),
then one result goes to Tune: the folds' mean metrics, `val_*_std` (their population standard
deviation), `cv_folds`, and fold 0's checkpoint (the model a search exports). ASHA sees every
epoch, so early stopping works as without folds. Each fold records its epochs' metrics next to
its checkpoints (`fold_epochs.json`), so a retried trial continues every fold where it stopped.

Example:
    >>> fold_of([0, 0, 0, 1, 1, 1], k=3, seed=0).tolist()  # each fold: one 0 and one 1
    [1, 2, 0, 2, 1, 0]
"""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa

from tl_ray import storage
from tl_ray.errors import DataError
from tl_ray.labels import Datasets
from tl_ray.train.session import TrialSession

__all__ = ["check_folds", "fold_of", "fold_datasets", "mean_of_folds", "run_folds_in_trial"]

EPOCHS_FILE = "fold_epochs.json"
SPREAD = ("val_loss", "val_accuracy", "val_f1")


def fold_of(labels: Any, k: int, seed: int) -> np.ndarray:
    """Each row's fold, 0..k-1: per label, rows shuffled by `seed` and dealt round-robin, so
    every fold's count of each label is within one of the others'.

    >>> folds = fold_of([0] * 5 + [1] * 4, k=2, seed=1)
    >>> sorted(np.bincount(folds[:5]).tolist()), sorted(np.bincount(folds[5:]).tolist())
    ([2, 3], [2, 2])
    """
    labels = np.asarray(labels)
    folds = np.empty(len(labels), dtype=np.int64)
    rng = np.random.default_rng(seed)
    start = 0
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        folds[rows] = (start + np.arange(len(rows))) % k
        start = (start + len(rows)) % k  # the next label's first row goes to the next fold
    return folds


def check_folds(datasets: Datasets, k: int) -> None:
    """DataError (one line) when a class has fewer rows than folds: a fold would miss it."""
    pooled = pa.concat_tables([datasets.train.select(["label"]), datasets.validation.select(["label"])])
    counts = np.bincount(pooled.column("label").to_numpy(), minlength=len(datasets.labels))
    for label, count in zip(datasets.labels.labels, counts.tolist()):
        if count < k:
            raise DataError(f"search.cv_folds is {k}, but class {label!r} has only {count} labeled "
                            f"rows (training and validation together); lower search.cv_folds")  # fmt: skip


def fold_datasets(datasets: Datasets, k: int, seed: int) -> list[Datasets]:
    """The k (train, validation) splits of the pooled rows: fold j validates, the rest train."""
    pooled = pa.concat_tables([datasets.train, datasets.validation.cast(datasets.train.schema)])
    folds = fold_of(pooled.column("label").to_numpy(), k, seed)
    return [replace(datasets, train=pooled.filter(pa.array(folds != j)), validation=pooled.filter(pa.array(folds == j)))
            for j in range(k)]  # fmt: skip


def mean_of_folds(per_fold: list[dict[str, Any]]) -> dict[str, Any]:
    """One epoch's result from each fold's metrics: numbers averaged, `val_*_std` spreads,
    anything else (node, checkpoint) from fold 0.

    >>> mean_of_folds([{"epoch": 1, "val_loss": 0.2}, {"epoch": 1, "val_loss": 0.4}])["val_loss_std"]
    0.1
    """
    result = {**per_fold[0], "cv_folds": len(per_fold)}
    for key, value in per_fold[0].items():
        values = [fold.get(key) for fold in per_fold]
        if key != "epoch" and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            result[key] = statistics.fmean(values)
    for key in SPREAD:
        if all(key in fold for fold in per_fold):
            result[f"{key}_std"] = round(statistics.pstdev([fold[key] for fold in per_fold]), 12)
    return result


class _EpochDone(Exception):
    """Raised by a FoldSession once its fold has reported the epoch it was run for."""


class FoldSession(TrialSession):
    """A TrialSession for one fold: it saves its fold's checkpoint and metrics for the epoch
    it is run for (`target`), then stops the loop; the next run resumes from that checkpoint."""

    def __init__(self, tables: dict[str, pa.Table], store: Any, *, cpus: float) -> None:
        super().__init__(tables, store, cpus=cpus)
        self.target = 0
        text = storage.read_text(store.location, EPOCHS_FILE)  # what a retried trial's fold did
        self.epochs: dict[int, dict[str, Any]] = {} if text is None else {int(e): m for e, m in json.loads(text).items()}

    def report(self, metrics: dict[str, Any], folder: Any = None) -> None:
        if metrics["epoch"] != self.target:  # the epoch resumed from, reported again: recorded
            return
        path = self.store.save(folder, metrics) if folder is not None else None
        self.epochs[self.target] = {**metrics, "checkpoint_path": path}
        storage.write_text(self.store.location, EPOCHS_FILE, json.dumps(self.epochs))
        raise _EpochDone


def run_folds_in_trial(cfg: Any, datasets: Datasets, *, storage_path: str, name: str) -> None:
    """A cross-validated Tune trial in this process (see the module docstring)."""
    from ray import tune

    from tl_ray.train.driver import KERAS_KINDS, _loop_config, _numbered
    from tl_ray.train.session import CheckpointStore

    tcfg, k = cfg.train, cfg.search.cv_folds
    if cfg.backbone.kind in KERAS_KINDS:
        from tl_ray.train.keras_loop import run_keras_loop as run_loop
    else:
        from tl_ray.train.loop import run_torch_loop as run_loop
    folds = []
    for j, split in enumerate(fold_datasets(datasets, k, cfg.search.seed)):
        store = CheckpointStore(f"{storage_path.rstrip('/')}/{name}/fold-{j}", keep=tcfg.keep_checkpoints,
                                metric=tcfg.metric, mode=tcfg.metric_mode)  # fmt: skip
        tables = {"train": _numbered(split.train), "validation": _numbered(split.validation)}
        config = _loop_config(cfg, split, None)  # no frozen-prefix cache: its rows are the unfolded splits'
        folds.append((FoldSession(tables, store, cpus=tcfg.cpus_per_worker), config))
    for epoch in range(1, tcfg.epochs + 1):
        for session, config in folds:
            if epoch in session.epochs:  # a retried trial: this fold has trained it already
                continue
            session.target = epoch
            try:
                run_loop(config, session)
            except _EpochDone:
                continue
            raise RuntimeError(f"fold loop ended without reporting epoch {epoch}")  # a loop bug
        tune.report(mean_of_folds([session.epochs[epoch] for session, _ in folds]))
