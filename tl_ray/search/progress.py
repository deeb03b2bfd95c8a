"""Driver-side Tune callbacks: a live line per epoch and per trial, and the durable epoch log."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from ray.tune import Callback

__all__ = ["EpochLog", "SearchProgress"]

_LOGGED = ("epoch", "train_loss", "val_loss", "val_accuracy", "val_f1", "samples_per_s", "lr",
           "epoch_s", "checkpoint_path", "unfreeze_depth", "resumed_from_epoch", "node_id",
           "val_loss_std", "val_accuracy_std", "val_f1_std", "cv_folds")  # fmt: skip


class EpochLog(Callback):
    """Appends every reported epoch to `path` (JSON lines) the moment the driver sees it.

    Flushed and fsynced per line, so a driver killed with no chance to clean up loses nothing
    it had seen (Tune's own result files are staged and synced later). A reader skips a
    torn last line. Each line: `launch`, `trial_id` (Tune's), `config`, and the metrics.
    """

    def __init__(self, path: str | Path, launch: str) -> None:
        self.path, self.launch = str(path), launch

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict[str, Any], **info) -> None:
        record = {"launch": self.launch, "trial_id": trial.trial_id, "config": trial.config,
                  **{key: result.get(key) for key in _LOGGED}}  # fmt: skip
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, default=str) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


class SearchProgress(Callback):
    """Prints `trial 3 epoch 2: val_accuracy 0.812 | best 0.840 (trial 1) | done 2, pruned 1, running 2`."""

    def __init__(self, metric: str, mode: str, max_epochs: int, echo: Callable[[str], None]) -> None:
        self.metric, self.mode, self.max_epochs, self.echo = metric, mode, max_epochs, echo
        self.best: tuple[float, int] | None = None
        self.last_epoch: dict[str, int] = {}
        self.done = self.pruned = 0

    def _better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best[0] if self.mode == "max" else value < self.best[0]

    def _status(self, running: int) -> str:
        best = "none yet" if self.best is None else f"{self.best[0]:.4f} (trial {self.best[1]})"
        return f"best {best} | done {self.done}, pruned {self.pruned}, running {running}"

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict[str, Any], **info) -> None:
        number = trial.config.get("optuna_trial", trial.trial_id)
        value = result.get(self.metric)
        if value is not None and self._better(value):
            self.best = (value, number)
        self.last_epoch[trial.trial_id] = result.get("epoch", 0)
        running = sum(1 for t in trials if t.status == "RUNNING")
        spread = result.get(f"{self.metric}_std")  # the folds' spread, with search.cv_folds
        shown = f"{value:.4f}" + ("" if spread is None else f" ± {spread:.4f}")
        self.echo(f"trial {number} epoch {result.get('epoch')}: {self.metric} {shown} | {self._status(running)}")

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._finish(trials, trial, "finished")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._finish(trials, trial, "failed")

    def _finish(self, trials: list, trial, how: str) -> None:
        number = trial.config.get("optuna_trial", trial.trial_id)
        if how == "finished" and self.last_epoch.get(trial.trial_id, 0) < self.max_epochs:
            how, self.pruned = "stopped early", self.pruned + 1
        self.done += 1
        running = sum(1 for t in trials if t.status == "RUNNING" and t is not trial)
        self.echo(f"trial {number} {how} | {self._status(running)}")
