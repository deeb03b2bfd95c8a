"""A training worker SIGKILLed mid-run: Ray Train restarts the group and resumes from the
last checkpoint (model, optimizer, scheduler, epoch), and the run ends with every epoch."""

from __future__ import annotations

import os
import signal
import threading
import time

from ray.util.state import list_actors

from helpers import make_sentiment_rows, write_csv
from tl_ray.config import parse_config
from tl_ray.train.driver import train


def _kill_a_worker_after_first_checkpoint(output, stop: threading.Event, killed: list[int]):
    # A second checkpoint folder appears only after Ray registered the first one.
    while not stop.is_set():
        if len([c for c in output.glob("train_*/checkpoint_*") if c.is_dir()]) >= 2:
            workers = list_actors(
                filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
            )
            if workers:
                pid = workers[-1]["pid"]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
        time.sleep(0.1)


def test_killed_worker_is_replaced_and_training_resumes(ray_session, tiny_bert, tmp_path, tmp_path_factory):
    data = write_csv(tmp_path / "big.csv", make_sentiment_rows(1200))
    epochs = 4
    cfg = parse_config(
        {
            "data": {"path": str(data), "validation_split": 0.1},
            "backbone": {"name_or_path": tiny_bert, "unfreeze_depth": 2},
            "train": {"epochs": epochs, "batch_size": 8, "max_length": 32, "num_workers": 2,
                      "max_failures": 2, "lr": 1e-3, "keep_checkpoints": epochs},
            "output": str(tmp_path / "run"),
        }
    )
    stop, killed = threading.Event(), []
    killer = threading.Thread(
        target=_kill_a_worker_after_first_checkpoint, args=(tmp_path / "run", stop, killed)
    )
    killer.start()
    try:
        outcome = train(cfg)
    finally:
        stop.set()
        killer.join()
    assert killed, "the run finished before a worker could be killed"
    assert outcome.final_metrics["epoch"] == epochs
    assert outcome.final_metrics["resumed_from_epoch"] >= 1
