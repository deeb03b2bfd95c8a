"""Every collective of the torch loop carries a tensor on the backend's device.

Ray Train's process group is NCCL with `use_gpu`, and NCCL reduces only CUDA tensors, so
the epoch totals and the validation tally must be reduced on `ray.train.torch.get_device()`.
A CPU machine cannot run NCCL; these tests check the invariant where it can be seen: on a
device that is not the CPU (`meta`) in one process, and in a real 2-worker gloo run.
"""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from tl_ray.errors import CheckpointError
from tl_ray.train.metrics import ClassificationTally, all_reduce_sum


@pytest.fixture
def recorded(monkeypatch):
    """A fake one-process group whose all_reduce records the device of what it is given."""
    devices: list[torch.device] = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, *a, **k: devices.append(tensor.device))
    return devices


def test_all_reduce_sum_carries_the_tensor_on_the_given_device(recorded):
    reduced = all_reduce_sum(torch.tensor([1.0, 2.0], dtype=torch.float64), torch.device("meta"))
    assert recorded == [torch.device("meta")]
    assert reduced.device == torch.device("meta")


def test_the_tally_lives_and_reduces_on_its_device(recorded):
    tally = ClassificationTally(3, device="meta")
    tally.add(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))  # CPU batches move over
    assert tally.confusion.device == tally.loss_sum.device == torch.device("meta")
    tally.reduce(lambda flat: all_reduce_sum(flat, "meta"))
    assert recorded == [torch.device("meta")]


def test_resume_state_loads_weights_only(tmp_path):
    """train_state.pt is read with weights_only=True: a pickle that runs code is refused."""
    from tl_ray.train.checkpoint import TRAIN_STATE_FILE
    from tl_ray.train.loop import read_train_state

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": 2},
               tmp_path / TRAIN_STATE_FILE)  # fmt: skip
    state = read_train_state(tmp_path)
    assert state["epoch"] == 2
    torch.optim.AdamW(model.parameters()).load_state_dict(state["optimizer"])

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / TRAIN_STATE_FILE).write_bytes(pickle.dumps({"epoch": Exploit()}))
    with pytest.raises(CheckpointError, match="cannot resume"):
        read_train_state(tmp_path)
    assert not marker.exists()


def test_two_worker_run_reduces_on_the_backend_device(ray_session, tiny_bert, sentiment_csv, tmp_path, monkeypatch):
    """The real loop on 2 gloo workers, with torch.distributed.all_reduce checked in each."""
    from tl_ray.config import parse_config
    from tl_ray.train import driver
    from tl_ray.train.loop import train_loop_per_worker

    record = tmp_path / "collectives"
    record.mkdir()

    def checked_loop(config):
        import ray.train.torch
        import torch.distributed as dist

        real = dist.all_reduce

        def all_reduce(tensor, *args, **kwargs):
            expected = ray.train.torch.get_device()
            with open(record / f"{os.getpid()}.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"device": str(tensor.device), "expected": str(expected)}) + "\n")
            if tensor.device != expected:
                raise AssertionError(f"all_reduce on {tensor.device}, backend device {expected}")
            return real(tensor, *args, **kwargs)

        dist.all_reduce = all_reduce
        train_loop_per_worker(config)

    monkeypatch.setattr(driver, "train_loop_per_worker", checked_loop)
    cfg = parse_config({
        "data": {"path": str(sentiment_csv), "validation_split": 0.25},
        "backbone": {"name_or_path": tiny_bert, "unfreeze_depth": 2, "pooling": "mean"},
        "train": {"epochs": 2, "batch_size": 16, "max_length": 32, "num_workers": 2, "cache": False},
        "output": str(tmp_path / "run"),
    })  # fmt: skip
    outcome = driver.train(cfg)
    assert outcome.final_metrics["epoch"] == 2
    calls = [json.loads(line) for path in record.iterdir() for line in path.read_text().splitlines()]
    # Each of the 2 workers reduces the epoch totals and the validation tally every epoch.
    assert len(list(record.iterdir())) == 2 and len(calls) == 2 * 2 * 2
    assert all(call["device"] == call["expected"] for call in calls)
