"""Optuna heartbeats: a dead driver's trials are failed and retried; a live search's are not."""

from __future__ import annotations

import time

import optuna
import pytest

from tl_ray.search import study as study_module
from tl_ray.search.study import Heartbeat, finished_trials, interrupted_numbers, open_study, settle_stale_trials, successors


@pytest.fixture
def quick_heartbeats(monkeypatch):
    monkeypatch.setattr(study_module, "HEARTBEAT_S", 1)
    monkeypatch.setattr(study_module, "GRACE_S", 2)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def started_trial(study, storage, name):
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    study_id = storage.get_study_id_from_name(name)
    storage.record_heartbeat(storage.get_trial_id_from_study_id_trial_number(study_id, trial.number))
    return trial


def test_two_searches_sharing_a_storage_do_not_disturb_each_other(tmp_path, quick_heartbeats):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    storage_a, study_a = open_study(url, "tl-ray-a-1", "max")
    storage_b, study_b = open_study(url, "tl-ray-b-2", "max")
    live = started_trial(study_a, storage_a, "tl-ray-a-1")
    with Heartbeat(storage_a, "tl-ray-a-1", lambda: [live.number]):
        time.sleep(0.5)
        assert settle_stale_trials(study_b, wait_s=3) == 0  # B sees none of A's trials
        assert settle_stale_trials(study_a, wait_s=3) == 1  # A's trial is alive: left RUNNING
    assert [t.state.name for t in study_a.trials] == ["RUNNING"]
    assert study_b.trials == []


def test_a_dead_drivers_trial_is_failed_and_retried_with_its_parameters(tmp_path, quick_heartbeats):
    storage, study = open_study(f"sqlite:///{tmp_path / 's.db'}", "tl-ray-x-3", "min")
    done = started_trial(study, storage, "tl-ray-x-3")
    study.tell(done, 0.5)
    orphan = started_trial(study, storage, "tl-ray-x-3")  # its driver dies: no more heartbeats
    assert settle_stale_trials(study, wait_s=10, poll_s=0.5) == 0
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "FAIL", "WAITING"]
    retry = study.trials[2]
    assert retry.params == study.trials[orphan.number].params
    assert interrupted_numbers(study) == {orphan.number}
    assert successors(study) == {orphan.number: retry.number}
    assert finished_trials(study) == 1  # the interrupted trial does not count against the budget


def test_a_trial_whose_driver_died_before_its_first_heartbeat_is_failed_and_retried(tmp_path, quick_heartbeats):
    """Killed between Optuna's ask and the first heartbeat: no heartbeat row, yet retried."""
    storage, study = open_study(f"sqlite:///{tmp_path / 's.db'}", "tl-ray-x-4", "min")
    orphan = study.ask()  # no heartbeat recorded, no parameters sampled yet
    assert settle_stale_trials(study, wait_s=1, poll_s=0.5) == 1  # younger than the grace: kept
    assert settle_stale_trials(study, wait_s=10, poll_s=0.5) == 0
    assert [t.state.name for t in study.trials] == ["FAIL", "WAITING"]
    assert interrupted_numbers(study) == {orphan.number}
    assert finished_trials(study) == 0
