"""Ray Tune's OptunaSearch, telling Optuna the score `best.json` ranks by.

Tune's OptunaSearch tells Optuna a trial's last reported value, and COMPLETE even when ASHA
stopped it early. Here Optuna gets one score per trial everywhere: the trial's best epoch
under the search metric (what `best.json` and `trials.parquet` rank), and a trial stopped
before the last epoch is PRUNED (its per-epoch values are still in the study, as Optuna's
intermediate values, for the sampler and for Optuna's own tools).

Example:
    >>> searcher = BestEpochOptunaSearch(space=define_by_run, metric="val_loss", mode="min",
    ...                                  max_epochs=3, storage=storage)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from ray.tune.search.optuna import OptunaSearch

__all__ = ["BestEpochOptunaSearch", "continued_seed"]


def continued_seed(seed: int, trials_so_far: int) -> int:
    """The sampler seed of a launch that follows `trials_so_far` trials of the study.

    A resumed search seeded as the first launch was would replay its sequence and train the
    configurations it already trained; each launch continues from its own seed instead.

    >>> continued_seed(0, 0), continued_seed(0, 3) != continued_seed(0, 0)
    (0, True)
    """
    return seed if trials_so_far == 0 else (seed * 1_000_003 + trials_so_far) % 2**32


class BestEpochOptunaSearch(OptunaSearch):
    """OptunaSearch that tells each trial's best epoch, and PRUNED for an early stop."""

    def __init__(self, *args: Any, max_epochs: int, epoch_attr: str = "epoch", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._max_epochs = max_epochs
        self._epoch_attr = epoch_attr
        self._best: dict[str, float] = {}
        self._last_epoch: dict[str, int] = {}

    def live_numbers(self) -> list[int]:
        """Optuna numbers of the trials this searcher started that have not finished."""
        return [t.number for tid, t in list(self._ot_trials.items()) if tid not in self._completed_trials]

    def _better(self, value: float, than: float | None) -> bool:
        return than is None or (value > than if self._mode == "max" else value < than)

    def _track(self, trial_id: str, result: dict | None) -> None:
        value = (result or {}).get(self._metric)
        if value is not None and self._better(value, self._best.get(trial_id)):
            self._best[trial_id] = value
        if (result or {}).get(self._epoch_attr) is not None:
            self._last_epoch[trial_id] = max(self._last_epoch.get(trial_id, 0), int(result[self._epoch_attr]))

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        if config is not None and trial_id in self._ot_trials:
            self._first_heartbeat(self._ot_trials[trial_id].number)
            self._inherit(trial_id)
        return config

    def _first_heartbeat(self, number: int) -> None:
        """A trial has a heartbeat from the moment it is asked, so a driver killed before the
        heartbeat thread saw it still leaves a trial that goes stale (and is retried)."""
        storage = self._storage
        if hasattr(storage, "record_heartbeat") and storage.get_heartbeat_interval():
            study_id = storage.get_study_id_from_name(self._study_name)
            storage.record_heartbeat(storage.get_trial_id_from_study_id_trial_number(study_id, number))

    def _inherit(self, trial_id: str) -> None:
        """A retry of an interrupted trial continues its run: it takes over its epochs."""
        trial = self._ot_trials[trial_id]
        frozen = next((t for t in self._ot_study.get_trials(deepcopy=False) if t.number == trial.number), None)
        done = self._ot_study.get_trials(deepcopy=False)
        for number in frozen.system_attrs.get("retry_history", []) if frozen is not None else []:
            for epoch, value in sorted(done[number].intermediate_values.items()):
                trial.report(value, epoch)
                self._track(trial_id, {self._metric: value, self._epoch_attr: epoch})

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Optuna's intermediate values are keyed by epoch (a resumed run starts past 1)."""
        if trial_id in self._completed_trials or result.get(self._metric) is None:
            return
        epoch = int(result[self._epoch_attr])
        if epoch > self._last_epoch.get(trial_id, 0):  # Tune may hand a result twice; a resume re-reports
            self._ot_trials[trial_id].report(result[self._metric], epoch)
        self._track(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        # The result on which ASHA stops a trial (or the last, at max_t) reaches only this hook.
        if not error and trial_id in self._ot_trials and trial_id not in self._completed_trials:
            self.on_trial_result(trial_id, result or {})
        if error or trial_id in self._completed_trials or trial_id not in self._best:
            super().on_trial_complete(trial_id, result, error)
            return
        from optuna.trial import TrialState

        trial = self._ot_trials[trial_id]
        if self._last_epoch.get(trial_id, self._max_epochs) < self._max_epochs:
            self._ot_study.tell(trial, state=TrialState.PRUNED)
        else:
            self._ot_study.tell(trial, self._best[trial_id], state=TrialState.COMPLETE)
        self._completed_trials.add(trial_id)
