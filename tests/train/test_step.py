"""The torch loop's schedule and step: transformers' linear warmup, continued across a resume.

The resume test runs the real loop (`run_torch_loop`) twice in this process on a tiny
word-vectors model through a minimal session (the loop's one door to Ray): once straight
through, once resumed from the first run's epoch-1 checkpoint.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest
import torch
from helpers import LocalSession, make_sentiment_rows

from tl_ray.train.step import TrainStep, linear_warmup

CASES = [(10, 0.0), (10, 0.1), (10, 0.35), (9, 0.5), (1, 0.5), (100, 0.99)]


@pytest.mark.parametrize("total, ratio", CASES)
def test_the_schedule_is_transformers_linear_warmup(total, ratio):
    from transformers import get_linear_schedule_with_warmup

    ours, theirs = (torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.1) for _ in range(2))
    mine = linear_warmup(ours, total, ratio)
    reference = get_linear_schedule_with_warmup(theirs, int(total * ratio), total)
    for _ in range(total + 2):
        assert mine.get_last_lr() == pytest.approx(reference.get_last_lr(), abs=1e-15)
        ours.step(), theirs.step(), mine.step(), reference.step()


def test_a_resumed_run_has_the_same_lr_at_every_step(ray_session, tiny_vectors, sentiment_csv, tmp_path,
                                                     monkeypatch):
    from tl_ray.config import parse_config
    from tl_ray.train.loop import run_torch_loop

    rows = make_sentiment_rows(60)
    names = ("neg", "pos")
    table = pa.table({"text": [t for t, _ in rows], "label": [names.index(label) for _, label in rows]})
    run = parse_config({
        "data": {"path": str(sentiment_csv)},
        "backbone": {"kind": "word-vectors", "vectors": tiny_vectors, "encoder": "cnn", "unfreeze_depth": 1},
        "train": {"epochs": 3, "batch_size": 16, "max_length": 16, "warmup_ratio": 0.5, "lr": 1e-2,
                  "cache": False},
        "output": str(tmp_path / "out"),
    }).model_dump()  # fmt: skip
    config = {"run": run, "labels": list(names), "train_rows": table.num_rows, "cache": None}
    tables = {"train": table, "validation": table.slice(0, 16)}

    lrs: list[float] = []  # the lr of every step, in order
    step_once = TrainStep.__call__

    def recording(self: TrainStep, inputs: Any, targets: Any) -> Any:
        lrs.append(self.lr)
        return step_once(self, inputs, targets)

    monkeypatch.setattr(TrainStep, "__call__", recording)
    straight = LocalSession(tables, tmp_path / "straight")
    run_torch_loop(config, straight)
    straight_lrs, lrs[:] = list(lrs), []

    resumed = LocalSession(tables, tmp_path / "resumed", resume=tmp_path / "straight" / "epoch-1")
    run_torch_loop(config, resumed)

    steps_per_epoch = 4  # ceil(60 / 16); 12 steps in all, 6 of warmup
    assert len(straight_lrs) == 12 and straight_lrs[0] == 0.0 and max(straight_lrs) == pytest.approx(1e-2)
    assert lrs == straight_lrs[steps_per_epoch:]  # the resumed run continues the same schedule
    # Epoch 1, resumed from, is reported once more (as it was: a driver may never have seen it),
    # named as the epoch resumed from.
    assert [r["epoch"] for r in resumed.reports] == [1, 2, 3]
    assert resumed.reports[0] == {**straight.reports[0], "resumed_from_epoch": 1}
    assert resumed.reports[1]["resumed_from_epoch"] == 1
    assert [r["lr"] for r in resumed.reports] == [r["lr"] for r in straight.reports]
    assert (tmp_path / "resumed" / "epoch-3" / "train_state.pt").is_file()
