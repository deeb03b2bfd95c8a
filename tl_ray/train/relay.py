"""Each epoch a Ray Train run reports, handed to a function on the driver.

Train V2 runs user callbacks in its controller actor, not in the driver: a callback there
that printed would print into that actor's log. `epochs_to(on_epoch)` gives the run a callback
that puts each report on a Ray queue (an actor, reachable from any node) and drains it on a
driver thread into `on_epoch`, in order, until the run is over.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Callable, Iterator

import ray.train

__all__ = ["epochs_to"]

log = logging.getLogger("tl_ray.train")


class _EpochRelay(ray.train.UserCallback):
    """In the Train controller: every report's (rank 0) metrics onto the driver's queue."""

    def __init__(self, queue) -> None:  # noqa: ANN001
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint) -> None:  # noqa: ANN001
        self.queue.put(dict(metrics[0]))


@contextlib.contextmanager
def epochs_to(on_epoch: Callable[[dict[str, Any]], None]) -> Iterator[ray.train.UserCallback]:
    """A callback for the Train run's RunConfig; `on_epoch` gets each epoch on this process."""
    from ray.util.queue import Empty, Queue

    queue = Queue()
    done = threading.Event()

    def drain() -> None:
        while True:
            try:
                metrics = queue.get(timeout=0.2)
            except Empty:
                if done.is_set():
                    return
                continue
            try:
                on_epoch(metrics)
            except Exception:  # a printing problem must not stop the run
                log.exception("epoch callback failed")

    thread = threading.Thread(target=drain, name="tl-ray-epochs", daemon=True)
    thread.start()
    try:
        yield _EpochRelay(queue)
    finally:
        done.set()
        thread.join(timeout=10)
        queue.shutdown()
