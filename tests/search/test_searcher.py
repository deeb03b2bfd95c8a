"""BestEpochOptunaSearch tells Optuna what best.json ranks by, as Tune's controller calls it."""

from __future__ import annotations

import optuna
import pytest

from tl_ray.search.searcher import BestEpochOptunaSearch, continued_seed


@pytest.fixture
def searcher():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    search = BestEpochOptunaSearch(
        space=lambda trial: {"x": trial.suggest_float("x", 0, 1)},
        metric="val_loss", mode="min", max_epochs=3, sampler=optuna.samplers.RandomSampler(seed=0),
    )  # fmt: skip
    return search


def epochs(searcher, trial_id, losses, stopped_at_last_result):
    """Report like Tune: the result on which a scheduler stops a trial goes only to on_trial_complete."""
    searcher.suggest(trial_id)
    results = [{"epoch": i + 1, "val_loss": loss, "training_iteration": i + 1} for i, loss in enumerate(losses)]
    for result in results[:-1] if stopped_at_last_result else results:
        searcher.on_trial_result(trial_id, result)
    searcher.on_trial_complete(trial_id, result=results[-1])


def test_a_finished_trial_is_told_its_best_epoch(searcher):
    epochs(searcher, "a", [0.6, 0.4, 0.5], stopped_at_last_result=False)
    trial = searcher._ot_study.trials[0]
    assert trial.state.name == "COMPLETE" and trial.value == 0.4  # not the last epoch's 0.5


def test_an_early_stopped_trial_is_pruned_even_at_its_first_result(searcher):
    epochs(searcher, "b", [0.7], stopped_at_last_result=True)
    epochs(searcher, "c", [0.7, 0.3], stopped_at_last_result=True)
    states = [t.state.name for t in searcher._ot_study.trials]
    assert states == ["PRUNED", "PRUNED"]
    assert searcher._ot_study.trials[1].intermediate_values == {1: 0.7, 2: 0.3}  # the stop result too


def test_a_failed_trial_is_failed(searcher):
    searcher.suggest("d")
    searcher.on_trial_result("d", {"epoch": 1, "val_loss": 0.5, "training_iteration": 1})
    searcher.on_trial_complete("d", error=True)
    assert searcher._ot_study.trials[0].state.name == "FAIL"


def test_a_resumed_launch_continues_the_sampler_sequence():
    assert continued_seed(7, 0) == 7
    assert len({continued_seed(7, n) for n in range(50)}) == 50
