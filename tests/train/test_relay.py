"""The epoch relay: its queue lives on the driver's node, and losing it never fails a run."""

from __future__ import annotations

import ray

from tl_ray.train.relay import epochs_to


def test_the_queue_is_on_the_drivers_node_and_epochs_arrive_in_order(ray_session):
    seen: list[dict] = []
    with epochs_to(seen.append) as relay:
        actor = relay.queue.actor
        where = ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))
        assert where == ray.get_runtime_context().get_node_id()  # a worker node's loss cannot take it
        for epoch in range(3):
            relay.after_report(None, [{"epoch": epoch}], None)
    assert seen == [{"epoch": 0}, {"epoch": 1}, {"epoch": 2}]


def test_a_lost_queue_is_logged_not_raised(ray_session, caplog):
    seen: list[dict] = []
    with epochs_to(seen.append) as relay:
        ray.kill(relay.queue.actor)
        relay.after_report(None, [{"epoch": 0}], None)  # the Train controller's call: must not raise
    assert not seen
    assert any("not relayed" in r.getMessage() or "relay lost" in r.getMessage() for r in caplog.records)
