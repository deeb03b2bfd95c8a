"""train.schedule (linear, slanted_triangular, cosine) step by step against transformers or
ULMFiT's formula, and train.head_lr's own parameter group."""

from __future__ import annotations

import math

import pytest
import torch

from tl_ray.backbones.registry import get_backbone
from tl_ray.config import parse_config
from tl_ray.errors import ConfigError
from tl_ray.train.step import TrainStep, lr_schedule

CASES = [(10, 0.0), (10, 0.1), (10, 0.35), (9, 0.5), (1, 0.5), (100, 0.99), (37, 0.06)]


def _curve(scheduler, optimizer, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step(), scheduler.step()
    return lrs


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.1)


@pytest.mark.parametrize("total, ratio", CASES)
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_linear_and_cosine_are_transformers_schedules(kind, total, ratio):
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    reference = {"linear": get_linear_schedule_with_warmup, "cosine": get_cosine_schedule_with_warmup}[kind]
    ours, theirs = _optimizer(), _optimizer()
    mine = _curve(lr_schedule(ours, total, ratio, kind), ours, total + 2)
    expected = _curve(reference(theirs, int(total * ratio), total), theirs, total + 2)
    assert mine == pytest.approx(expected, abs=1e-15)


def _ulmfit(t: int, total: int, cut_frac: float, lr_max: float, ratio: float = 32) -> float:
    """Howard & Ruder (2018), eq. 3, with p held at 0 past the end of the triangle."""
    cut = math.floor(total * cut_frac)
    if t < cut:
        p = t / cut
    else:
        p = max(0.0, 1 - (t - cut) / (cut * (1 / cut_frac - 1))) if cut else max(0.0, 1 - t / total)
    return lr_max * (1 + p * (ratio - 1)) / ratio


@pytest.mark.parametrize("total, ratio", CASES)
def test_slanted_triangular_is_ulmfits_formula(total, ratio):
    optimizer = _optimizer()
    lrs = _curve(lr_schedule(optimizer, total, ratio, "slanted_triangular"), optimizer, total + 1)
    assert lrs == pytest.approx([_ulmfit(t, total, ratio, 0.1) for t in range(total + 1)], rel=1e-12)
    assert min(lrs) >= 0.1 / 32 - 1e-15 and max(lrs) <= 0.1 + 1e-15


def test_slanted_triangular_peaks_at_the_cut():
    optimizer = _optimizer()
    lrs = _curve(lr_schedule(optimizer, 100, 0.1, "slanted_triangular"), optimizer, 101)
    assert lrs.index(max(lrs)) == 10 and lrs[0] == pytest.approx(0.1 / 32) and lrs[100] == pytest.approx(0.1 / 32)


def test_linear_stays_the_default():
    cfg = parse_config({"data": {"path": "x"}})
    assert cfg.train.schedule == "linear" and cfg.train.head_lr is None


@pytest.mark.parametrize("train, backbone, message", [
    ({"schedule": "step"}, {}, "train.schedule"),
    ({"head_lr": 0}, {}, "train.head_lr"),
    ({"head_lr": 1e-3}, {"kind": "keras-image"}, "train.head_lr applies to the torch backbones"),
    ({"schedule": "cosine"}, {"kind": "keras-image"}, "train.schedule cosine applies to the torch backbones"),
])  # fmt: skip
def test_bad_settings_are_one_line_config_errors(train, backbone, message):
    with pytest.raises(ConfigError, match=message) as error:
        parse_config({"data": {"path": "x"}, "train": train, "backbone": backbone})
    assert "\n" not in str(error.value)


def _step(tiny_bert, **train):
    cfg = parse_config({"data": {"path": "x"}, "train": {"lr": 1e-3, **train},
                        "backbone": {"name_or_path": tiny_bert, "unfreeze_depth": 1, "lr_decay": 0.5,
                                     "pooling": "cls"}})  # fmt: skip
    backbone = get_backbone(cfg.backbone)
    model = backbone.build(num_labels=2)
    backbone.apply_unfreeze(model)
    return TrainStep.build(backbone, model, model, cfg, total_steps=20, device=torch.device("cpu")), model


def test_head_lr_puts_the_head_in_its_own_group(tiny_bert):
    step, model = _step(tiny_bert, head_lr=3e-2, warmup_ratio=0.0)
    head = {id(p) for p in model.classifier.parameters()}
    groups = step.optimizer.param_groups
    head_groups = [g for g in groups if {id(p) for p in g["params"]} & head]
    assert all({id(p) for p in g["params"]} <= head for g in head_groups)  # nothing else in them
    assert {id(p) for g in head_groups for p in g["params"]} == head
    assert [g["lr"] for g in head_groups] == [3e-2, 3e-2]  # weight (decayed) and bias (not)
    assert sorted(g["weight_decay"] for g in head_groups) == [0.0, 0.01]
    pooler = [g for g in groups if any(p is model.encoder.pooler.dense.weight for p in g["params"])]
    assert pooler[0]["lr"] == 1e-3  # the pooler stays at lr (depth 0 below the head)
    assert step.lr == 1e-3  # the reported lr is train.lr on the schedule, not the head's


def test_without_head_lr_the_groups_are_as_before(tiny_bert):
    step, model = _step(tiny_bert)
    depth0 = step.optimizer.param_groups[:2]
    assert any(p is model.classifier.weight for p in depth0[0]["params"]) and depth0[0]["initial_lr"] == 1e-3
    assert any(p is model.encoder.pooler.dense.weight for p in depth0[0]["params"])
    assert [g["initial_lr"] for g in step.optimizer.param_groups] == [1e-3, 1e-3, 5e-4, 5e-4]


def test_head_lr_follows_the_schedule(tiny_bert):
    step, model = _step(tiny_bert, head_lr=3e-2, schedule="cosine", warmup_ratio=0.25)
    for _ in range(7):
        step.optimizer.step(), step.scheduler.step()
    factor = step.scheduler.lr_lambdas[0](7)
    assert 0 < factor < 1
    lrs = step.scheduler.get_last_lr()
    assert lrs[0] == pytest.approx(3e-2 * factor) and step.lr == pytest.approx(1e-3 * factor)
