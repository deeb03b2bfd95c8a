"""Each epoch a Ray Train run reports, handed to a function on the driver.

Train V2 runs user callbacks in its controller actor, not in the driver: a callback there
that printed would print into that actor's log. `epochs_to(on_epoch)` gives the run a callback
that puts each report on a Ray queue (an actor, reachable from any node) and drains it on a
driver thread into `on_epoch`, in order, until the run is over.

The queue lives on the driver's node, so losing a worker node cannot take it down, and a
report that cannot be relayed is logged, never an error of the run: the epoch lines are
for the terminal, the run's results do not go through them.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Callable, Iterator

import ray
import ray.train

__all__ = ["epochs_to"]

log = logging.getLogger("tl_ray.train")


class _EpochRelay(ray.train.UserCallback):
    """In the Train controller: every report's (rank 0) metrics onto the driver's queue."""

    def __init__(self, queue) -> None:  # noqa: ANN001
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint) -> None:  # noqa: ANN001
        try:
            self.queue.put(dict(metrics[0]), timeout=10)
        except Exception as error:  # noqa: BLE001  the queue is gone: lines lost, run goes on
            log.warning("epoch not relayed to the driver: %s", type(error).__name__)


@contextlib.contextmanager
def epochs_to(on_epoch: Callable[[dict[str, Any]], None]) -> Iterator[ray.train.UserCallback]:
    """A callback for the Train run's RunConfig; `on_epoch` gets each epoch on this process."""
    from ray.util.queue import Empty, Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()  # the driver's node: it outlives the run
    queue = Queue(actor_options={
        "num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(here, soft=False)})  # fmt: skip
    done = threading.Event()

    def drain() -> None:
        while True:
            try:
                metrics = queue.get(timeout=0.2)
            except Empty:
                if done.is_set():
                    return
                continue
            except Exception:  # noqa: BLE001  the queue actor is gone: nothing more will come
                log.warning("epoch relay lost; the run goes on without epoch lines")
                return
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
