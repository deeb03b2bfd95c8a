"""The search's Optuna study: its storage, heartbeats, and trials left behind by a dead driver.

A search driver records a heartbeat for each trial it runs (Optuna's heartbeat, in the study's
own storage). A trial still RUNNING whose heartbeat stopped (the driver was killed or Ctrl-C'd)
is failed by Optuna's `fail_stale_trials`, and `RetryHeartbeatStaleTrialCallback` queues a
retry with the same parameters; the retry trains under the same Train run name, so Ray Train
continues it from its last checkpoint. Trials of a search that is still alive keep fresh
heartbeats and are never touched, and each search has its own study name, so searches that
share one `search.storage` do not see each other's trials.

Example:
    >>> storage, study = open_study("sqlite:///runs/x/study.db", "tl-ray-x-1a2b3c4d", "max")  # doctest: +SKIP
    >>> settle_stale_trials(study)                                                    # doctest: +SKIP
    0
"""

from __future__ import annotations

import threading
import time
import warnings
from typing import Any, Callable, Iterable

from tl_ray.errors import ConfigError

__all__ = [
    "HEARTBEAT_S",
    "Heartbeat",
    "finished_trials",
    "interrupted_numbers",
    "open_study",
    "run_name_of",
    "settle_stale_trials",
    "successors",
]

HEARTBEAT_S = 5  # how often a live driver records each running trial's heartbeat
GRACE_S = 15  # a RUNNING trial whose heartbeat is older than this belongs to a dead driver
MAX_RETRY = 3  # retries of one trial whose driver died, before it stays failed


def open_study(url: str, name: str, mode: str):
    """(storage, study) for `url`, with heartbeats and retries of stale trials."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    # tl-ray prints its own line per trial and epoch: Optuna's INFO lines ("A new study
    # created ...") and its warnings that heartbeats, retries and `group` are experimental
    # (they are what tl-ray relies on, pinned in constraints.txt) stay off the terminal.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        storage = optuna.storages.RDBStorage(
            url,
            heartbeat_interval=HEARTBEAT_S,
            grace_period=GRACE_S,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
        )
    except Exception as error:  # SQLAlchemy raises many types for a bad URL
        raise ConfigError(f"search.storage: cannot open {url!r}: {str(error).splitlines()[0]}") from None
    # Optuna warns on every ask() that heartbeats are meant for Study.optimize; tl-ray records
    # them itself (Heartbeat below), so the warning is noise on the search's output.
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
    direction = "maximize" if mode == "max" else "minimize"
    study = optuna.create_study(storage=storage, study_name=name, direction=direction, load_if_exists=True)
    return storage, study


def interrupted_numbers(study) -> set[int]:
    """Trials whose driver died while they ran (a retry of each was queued)."""
    numbers: set[int] = set()
    for trial in study.get_trials(deepcopy=False):
        numbers.update(trial.system_attrs.get("retry_history", []))
        if trial.user_attrs.get("interrupted"):  # searches from before heartbeats
            numbers.add(trial.number)
    return numbers


def successors(study) -> dict[int, int]:
    """Interrupted trial number -> the number of the retry that carries its run on.

    >>> successors(study)  # doctest: +SKIP
    {1: 5}
    """
    found: dict[int, int] = {}
    for trial in study.get_trials(deepcopy=False):  # in number order: the last retry wins
        for number in trial.system_attrs.get("retry_history", []):
            found[number] = trial.number
    return found


def finished_trials(study) -> int:
    """Trials that count against the budget: complete, pruned, or failed on their own."""
    from optuna.trial import TrialState

    interrupted = interrupted_numbers(study)
    return sum(
        1
        for t in study.get_trials(deepcopy=False)
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        or (t.state == TrialState.FAIL and t.number not in interrupted)
    )


def settle_stale_trials(study, wait_s: float = GRACE_S + 2 * HEARTBEAT_S, poll_s: float = 1.0) -> int:
    """Fail (and queue retries of) RUNNING trials whose driver is gone; how many are left.

    A driver killed a moment ago left heartbeats younger than the grace period, so this waits
    up to `wait_s` for them to go stale. Trials still RUNNING after that have a live driver
    (another process is running this search) and are left alone.
    """
    import optuna
    from optuna.trial import TrialState

    deadline = time.monotonic() + wait_s
    while True:
        optuna.storages.fail_stale_trials(study)
        _fail_never_beaten(study)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running or time.monotonic() >= deadline:
            return len(running)
        time.sleep(poll_s)


def _fail_never_beaten(study) -> None:
    """Fail (and retry) RUNNING trials older than the grace period that never had a heartbeat.

    A driver records a trial's first heartbeat right after asking for it; one killed in
    between leaves a trial Optuna's `fail_stale_trials` never fails (it only looks at trials
    with a heartbeat). No live driver leaves a trial that long without one.
    """
    import datetime

    from optuna.storages import RDBStorage
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
    from optuna.trial import TrialState

    storage = study._storage
    backend = getattr(storage, "_backend", storage)  # Optuna wraps an RDBStorage in a cache
    if not isinstance(backend, RDBStorage):
        return
    old = datetime.datetime.now() - datetime.timedelta(seconds=GRACE_S)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.datetime_start is None or trial.datetime_start > old:
            continue
        with _create_scoped_session(backend.scoped_session) as session:
            if models.TrialHeartbeatModel.where_trial_id(trial._trial_id, session) is not None:
                continue
        try:
            storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except Exception:  # noqa: BLE001  another process settled it first
            continue
        callback = storage.get_heartbeat_stale_trial_callback()
        if callback is not None:
            callback(study, storage.get_trial(trial._trial_id))


def run_name_of(trial) -> str:
    """The Train run name of an Optuna trial: a retry reuses its original trial's, so Ray
    Train continues that run from its last checkpoint."""
    from optuna.trial import TrialState

    running = trial.study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
    frozen = next((t for t in running if t.number == trial.number), None)
    history = frozen.system_attrs.get("retry_history", []) if frozen is not None else []
    return f"optuna_{history[0] if history else trial.number}"


class Heartbeat:
    """Records a heartbeat for each trial number `live()` returns, from a daemon thread.

    >>> with Heartbeat(storage, study_name, lambda: [0, 1]):  # doctest: +SKIP
    ...     tuner.fit()
    """

    def __init__(self, storage, study_name: str, live: Callable[[], Iterable[int]]) -> None:
        self.storage, self.live = storage, live
        self.study_id = storage.get_study_id_from_name(study_name)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tl-ray-heartbeat", daemon=True)
        self._last: dict[int, float] = {}

    def beat(self) -> None:
        """Record heartbeats: new trials at once, the others every HEARTBEAT_S."""
        now = time.monotonic()
        for number in list(self.live()):
            if now - self._last.get(number, -HEARTBEAT_S) >= HEARTBEAT_S:
                trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)
                self.storage.record_heartbeat(trial_id)
                self._last[number] = now

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.beat()
            except Exception:  # a storage hiccup must not kill the search; the next beat retries
                continue

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
