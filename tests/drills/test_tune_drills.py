"""Drills on a real `tl-ray tune` subprocess, stopped mid-search once a trial has finished and
another is part-way through, then continued with `tl-ray tune --resume`:

- SIGKILL of the driver (no handler runs) is tests/search/test_tune.py's `search` fixture:
  finished trials untouched, every trial accounted for, study.db, trials.parquet and
  best.json agreeing.
- SIGTERM (what `kill`, systemd and Kubernetes send): Tune's graceful stop, as Ctrl-C; the
  command exits within the bound with 143 and one line saying how to continue, and
  `--resume` completes the search.

Each drill prints one JSON line with its figures (run with -s to see them).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from helpers import make_sentiment_rows, write_csv
from search.test_tune import complete_trials, part_way_trials, run_cli, study_of, write_inputs

pytestmark = pytest.mark.slow
TRIALS = 4
EXIT_BOUND_S = 20.0  # well inside Kubernetes' 30 s between SIGTERM and SIGKILL


def _start_search(tmp_path: Path, tiny_bert: str) -> tuple[subprocess.Popen, Path]:
    """A TRIALS-trial search of the tiny BERT (in-process trials, epochs of about 2 s),
    returned once one trial has finished and another has reported an epoch."""
    data = write_csv(tmp_path / "data.csv", make_sentiment_rows(1440))
    # No early stopping: trials 0 and 1 run side by side and end together, so the moment "one
    # finished, another part-way" must come from trials 2 and 3, which ASHA may stop at once.
    config, space = write_inputs(tmp_path, tiny_bert, data, trials=TRIALS, batch_size=8, early_stopping=False)
    folder = tmp_path / "search"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    driver = subprocess.Popen(
        [sys.executable, "-m", "tl_ray", "tune", str(config), "--space", str(space)],
        stdout=subprocess.PIPE, stderr=(tmp_path / "first.err").open("w"), text=True, env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 600
    while driver.poll() is None and time.monotonic() < deadline:
        if complete_trials(folder) and part_way_trials(folder):
            return driver, folder
        time.sleep(0.1)
    driver.kill()
    pytest.fail("no trial finished with another part-way: " + (tmp_path / "first.err").read_text()[-3000:])


def check_accounted(folder: Path, trials: int) -> dict:
    """Every trial accounted for, and study.db, trials.parquet and best.json agreeing."""
    study = study_of(folder)
    states = {t.number: t.state.name for t in study.trials}
    assert not [n for n, s in states.items() if s in ("RUNNING", "WAITING")], states
    finished = {n for n, s in states.items() if s in ("COMPLETE", "PRUNED")}
    assert len(finished) == trials, states
    retried = {n: t.number for t in study.trials for n in t.system_attrs.get("retry_history", [])}
    failed = {n for n, s in states.items() if s == "FAIL"}
    assert failed <= set(retried), f"a failed trial was never retried: {states}"  # all killed, all retried
    assert all(states[retried[n]] in ("COMPLETE", "PRUNED") for n in failed), (states, retried)

    rows = pq.read_table(folder / "trials.parquet").to_pylist()
    lost: list[tuple[int, int]] = []
    keys = [(r["trial"], r["epoch"]) for r in rows]
    assert len(keys) == len(set(keys)), "an epoch is written twice in trials.parquet"
    assert {r["trial"] for r in rows} == finished, "trials.parquet and the study name other trials"
    for number in finished:
        mine = [r for r in rows if r["trial"] == number]
        assert {r["status"] for r in mine} == {states[number].lower()}, (number, mine)
        epochs = sorted(r["epoch"] for r in mine)
        lost += [(number, e) for e in range(1, epochs[-1] + 1) if e not in epochs]
        trial = study.trials[number]
        if states[number] == "COMPLETE":
            assert epochs[-1] == 3 and trial.value == pytest.approx(min(r["val_loss"] for r in mine))
        else:
            assert epochs[-1] < 3
    best = json.loads((folder / "best.json").read_text(encoding="utf-8"))
    best_row = min(rows, key=lambda r: r["val_loss"])
    assert (best["trial"], best["epoch"], best["value"]) == (best_row["trial"], best_row["epoch"], best_row["val_loss"])
    assert best["trials"] == trials and best["pruned"] == sum(s == "PRUNED" for s in states.values())
    if states[best["trial"]] == "COMPLETE":
        assert study.best_trial.number == best["trial"]
    exported = json.loads((folder / "model" / "manifest.json").read_text(encoding="utf-8"))
    assert exported["epoch"] == best["epoch"]
    return {"study": states, "retried": retried, "lost_epochs": lost}




def test_sigterm_stops_tune_in_time_then_resume_completes(tmp_path, tiny_bert):
    driver, folder = _start_search(tmp_path, tiny_bert)
    sent = time.monotonic()
    driver.send_signal(signal.SIGTERM)
    try:
        out, _ = driver.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        driver.kill()
        pytest.fail("tl-ray tune still running 120 s after SIGTERM")
    took = time.monotonic() - sent
    err = (tmp_path / "first.err").read_text(encoding="utf-8")
    assert driver.returncode == 143, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted (SIGTERM): ") and f"tl-ray tune --resume {folder}" in last, last
    assert "Traceback" not in err and out.strip() == ""  # no best.json line for a search cut short
    assert took < EXIT_BOUND_S, f"exited {took:.1f} s after SIGTERM"
    before = complete_trials(folder)

    code, lines = run_cli(["tune", "--resume", str(folder)])
    assert code == 0
    assert {n: v for n, v in complete_trials(folder).items() if n in before} == before
    accounted = check_accounted(folder, TRIALS)
    print(json.dumps({"drill": "tune-sigterm", "exit_s": round(took, 2), "exit_code": driver.returncode,
                      "finished_before": len(before), "interrupted": len(accounted["retried"]),
                      "lost_epochs": accounted["lost_epochs"]}))
    # A trial that saved epoch k's checkpoint and was stopped before the driver logged that
    # report resumes from it and reports epoch k once more: no epoch lost.
    assert not accounted["lost_epochs"], accounted
