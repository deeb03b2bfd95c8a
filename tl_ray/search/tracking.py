"""Trial curves where ML teams look: TensorBoard event files, and MLflow runs when asked.

TensorBoard (always): OUTPUT/tensorboard/trial_<n>/ holds Optuna trial n's per-epoch metrics
(step = epoch) and its sampled parameters for the HParams dashboard (see `train.events`).

MLflow (`search.mlflow_uri`): one MLflow run per Optuna trial, named `trial <n>` and tagged with
the study, holding the sampled parameters and the per-epoch metrics (step = epoch). A resumed
search continues the same runs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from tl_ray.errors import ConfigError, TLRayError
from tl_ray.train.events import EpochWriter, scalars, sampled_params, tensorboard_dir

__all__ = ["MLflowTrials", "TensorBoardTrials", "open_mlflow"]

TRIAL_TAG, STUDY_TAG = "tl_ray.trial", "tl_ray.study"


class TensorBoardTrials(Callback):
    """Tune callback: each Optuna trial's epochs into OUTPUT/tensorboard/trial_<n>/."""

    def __init__(self, output: str | Path, metric: str) -> None:
        self.root, self.metric = tensorboard_dir(output), metric
        self.writers: dict[str, EpochWriter] = {}

    def _writer(self, trial) -> EpochWriter:
        if trial.trial_id not in self.writers:
            number = trial.config.get("optuna_trial", trial.trial_id)
            name = f"trial_{number:03d}" if isinstance(number, int) else f"trial_{number}"
            self.writers[trial.trial_id] = EpochWriter(self.root / name, trial.config, self.metric)
        return self.writers[trial.trial_id]

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._writer(trial)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict[str, Any], **info) -> None:
        self._writer(trial).write(result)

    def _close(self, trial) -> None:
        writer = self.writers.pop(trial.trial_id, None)
        if writer is not None:
            writer.close()

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._close(trial)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._close(trial)

    def on_experiment_end(self, trials: list, **info) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()


def _is_file_store(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file:")


def open_mlflow(uri: str, experiment: str) -> str:
    """The MLflow experiment id for `experiment` at `uri` (created if new); checked before any
    trial starts, so a wrong URI or a missing package is one line, not a failed search."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError("search.mlflow_uri needs mlflow: pip install 'tl-ray[tracking]'") from None
    if _is_file_store(uri):  # the user asked for a file store: MLflow keeps it, read-mostly
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        return found.experiment_id if found is not None else client.create_experiment(experiment)
    except Exception as error:  # MlflowException, connection errors, bad URIs
        line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TLRayError(f"cannot use MLflow at {uri}: {line[:300]}") from None


class MLflowTrials(Callback):
    """Tune callback: one MLflow run per Optuna trial; a resumed search reopens its runs."""

    def __init__(self, uri: str, experiment_id: str, study: str) -> None:
        self.uri, self.experiment_id, self.study = uri, experiment_id, study
        self.runs: dict[str, str] = {}
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _run(self, trial) -> str:
        if trial.trial_id in self.runs:
            return self.runs[trial.trial_id]
        number = trial.config.get("optuna_trial", trial.trial_id)
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{STUDY_TAG}` = '{self.study}' and tags.`{TRIAL_TAG}` = '{number}'",
            max_results=1,
        )
        if found:  # an interrupted trial of this study: continue its run
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment_id, run_name=f"trial {number}",
                                         tags={STUDY_TAG: self.study, TRIAL_TAG: str(number)})  # fmt: skip
            run_id = run.info.run_id
            from mlflow.entities import Param

            params = [Param(key, str(value)) for key, value in sampled_params(trial.config).items()]
            self.client.log_batch(run_id, params=params)
        self.runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._run(trial)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict[str, Any], **info) -> None:
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(result.get("epoch") or 0)
        metrics = [Metric(key, value, now, step) for key, value in scalars(result).items()]
        self.client.log_batch(self._run(trial), metrics=metrics)

    def _end(self, trial, status: str) -> None:
        run_id = self.runs.pop(trial.trial_id, None)
        if run_id is not None:
            self.client.set_terminated(run_id, status=status)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._end(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._end(trial, "FAILED")

    def on_experiment_end(self, trials: list, **info) -> None:
        for trial_id in list(self.runs):  # trials Tune left unfinished (a stopped search)
            self.client.set_terminated(self.runs.pop(trial_id), status="KILLED")
