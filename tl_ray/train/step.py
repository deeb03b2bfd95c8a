"""The torch loop's optimisation: AdamW over the backbone's parameter groups, the learning-rate
schedule (`train.schedule`: linear, slanted_triangular or cosine), the optimizer gaining the
parameters an unfreeze schedule frees, and the training step itself (no Ray in here).

`loop.py` runs it in every worker; `benchmarks/train_throughput.py` runs the very same step
for its plain single-process figure, so the benchmark measures this code, not a copy.

Example:
    >>> step = TrainStep.build(backbone, model, model, cfg, total_steps=100, device=device)  # doctest: +SKIP
    >>> seen, loss_sum = step.epoch(batches, inputs_of)                                      # doctest: +SKIP
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, ContextManager, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SCHEDULES", "TrainStep", "autocast_for", "cosine_warmup_factor", "linear_warmup",
           "linear_warmup_factor", "lr_schedule", "slanted_triangular_factor"]

Batch = dict[str, np.ndarray]  # a numpy batch of a Ray Data shard (or a TableShard)


def linear_warmup_factor(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """The learning-rate factor at optimiser step `step`: 0 -> 1 over `warmup_steps`, then
    linearly down to 0 at `total_steps`. This is transformers' `get_linear_schedule_with_warmup`
    to the letter (tests compare the two); it lives here because the torch loop also trains
    word-vectors models, whose install (`tl-ray[word-vectors]`) has no transformers.

    >>> [linear_warmup_factor(s, warmup_steps=2, total_steps=6) for s in range(7)]
    [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]
    """
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))


def cosine_warmup_factor(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """0 -> 1 over `warmup_steps`, then half a cosine down to 0 at `total_steps`: transformers'
    `get_cosine_schedule_with_warmup` (num_cycles 0.5) to the letter, here for the same reason
    as `linear_warmup_factor` (tests compare the two).

    >>> [round(cosine_warmup_factor(s, warmup_steps=1, total_steps=5), 4) for s in range(6)]
    [0.0, 1.0, 0.8536, 0.5, 0.1464, 0.0]
    """
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))


def slanted_triangular_factor(step: int, *, total_steps: int, cut_frac: float, ratio: float = 32.0) -> float:
    """ULMFiT's slanted triangular rate (Howard & Ruder 2018, eq. 3) as a factor of lr_max:
    with cut = floor(T * cut_frac), p = t / cut for t < cut, else
    1 - (t - cut) / (cut * (1 / cut_frac - 1)); the factor is (1 + p * (ratio - 1)) / ratio.
    p stops at 0 (rounding cut down could take it below near T); with cut 0 (no warmup) it
    falls from 1 over the T steps.

    >>> [slanted_triangular_factor(s, total_steps=10, cut_frac=0.2, ratio=2) for s in (0, 1, 2, 6, 10)]
    [0.5, 0.75, 1.0, 0.75, 0.5]
    """
    cut = math.floor(total_steps * cut_frac)
    if step < cut:
        p = step / cut
    else:
        span = cut * (1 / cut_frac - 1) if cut > 0 else max(1, total_steps)
        p = max(0.0, 1 - (step - cut) / span)
    return (1 + p * (ratio - 1)) / ratio


SCHEDULES = ("linear", "slanted_triangular", "cosine")


def lr_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float,
                kind: str = "linear") -> torch.optim.lr_scheduler.LambdaLR:  # fmt: skip
    """A LambdaLR of `train.schedule` `kind`, peaking after `int(total_steps * warmup_ratio)`
    steps (slanted_triangular: its cut_frac is warmup_ratio, its ratio 32).

    Its state (the step count) goes into a checkpoint's `train_state.pt`, so a resumed run
    continues the schedule where it stopped.
    """
    warmup_steps = int(total_steps * warmup_ratio)
    if kind == "linear":
        factor = partial(linear_warmup_factor, warmup_steps=warmup_steps, total_steps=total_steps)
    elif kind == "cosine":
        factor = partial(cosine_warmup_factor, warmup_steps=warmup_steps, total_steps=total_steps)
    elif kind == "slanted_triangular":
        factor = partial(slanted_triangular_factor, total_steps=total_steps, cut_frac=warmup_ratio)
    else:
        raise ValueError(f"train.schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def linear_warmup(optimizer: torch.optim.Optimizer, total_steps: int,
                  warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:  # fmt: skip
    """`lr_schedule(..., "linear")`: `linear_warmup_factor` over `int(total_steps * warmup_ratio)`
    warmup steps."""
    return lr_schedule(optimizer, total_steps, warmup_ratio, "linear")


def autocast_for(device: torch.device) -> ContextManager[Any]:
    """bfloat16 autocast on CUDA, nothing elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@dataclass
class TrainStep:
    """One optimisation step of the torch loop, and an epoch of them.

    A step: forward (under autocast on CUDA), cross-entropy, backward, grad-norm clip, AdamW
    step, schedule step. `unfreeze(depth)` frees more layers: the optimizer gains their
    parameters, in new groups at their layer-wise rates, on the running schedule.
    """

    backbone: Any
    model: nn.Module  # what the forward pass runs: the DDP wrapper in a worker group
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    trainable: list[nn.Parameter]
    grad_clip: float | None
    device: torch.device
    cfg: Any = None  # the RunConfig: the rates of groups added by `unfreeze`
    raw_model: nn.Module | None = None  # the unwrapped model (`model` may be its DDP wrapper)

    @classmethod
    def build(cls, backbone: Any, model: nn.Module, wrapped: nn.Module, cfg: Any, *,
              total_steps: int, device: torch.device) -> TrainStep:  # fmt: skip
        """AdamW over `backbone.param_groups(model, ...)` (after `apply_unfreeze`) and the schedule."""
        tcfg = cfg.train
        groups = cls._groups(backbone, model, cfg, exclude=())
        optimizer = torch.optim.AdamW(groups)
        scheduler = lr_schedule(optimizer, total_steps, tcfg.warmup_ratio, tcfg.schedule)
        return cls(backbone, wrapped, optimizer, scheduler, [p for group in groups for p in group["params"]],
                   tcfg.grad_clip, device, cfg, model)  # fmt: skip

    @staticmethod
    def _groups(backbone: Any, model: nn.Module, cfg: Any, exclude: Any) -> list[dict[str, Any]]:
        tcfg, lr_decay = cfg.train, getattr(cfg.backbone, "lr_decay", 1.0)
        return backbone.param_groups(model, tcfg.lr, tcfg.weight_decay, lr_decay, head_lr=tcfg.head_lr,
                                     exclude=exclude)  # fmt: skip

    def unfreeze(self, depth: int) -> int:
        """Train the top `depth` layers from the next step on; returns how many parameters the
        optimizer gained. Their groups join the schedule at its current step (same factor as
        every other group), so lr_decay's layer-wise rates hold across the change."""
        model = self.raw_model
        self.backbone.apply_unfreeze(model, depth)
        groups = self._groups(self.backbone, model, self.cfg, exclude=self.trainable)
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for group in groups:
            base_lr = group["lr"]
            self.optimizer.add_param_group({**group, "initial_lr": base_lr, "lr": base_lr * factor})
            self.scheduler.base_lrs.append(base_lr)
            self.scheduler.lr_lambdas.append(self.scheduler.lr_lambdas[0])
            self.scheduler._last_lr.append(base_lr * factor)
            self.trainable.extend(group["params"])
        return sum(len(group["params"]) for group in groups)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    @property
    def lr(self) -> float:
        """`train.lr` times the schedule's factor now (the rate of the top layer's groups)."""
        if self.cfg is None:
            return self.scheduler.get_last_lr()[0]
        return self.cfg.train.lr * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)

    def __call__(self, inputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        """Train on one batch; returns its mean loss (a device tensor: no host sync)."""
        with autocast_for(self.device):
            loss = F.cross_entropy(self.backbone.logits(self.model, inputs).float(), targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach()

    def epoch(self, batches: Iterable[Batch], inputs_of: Callable[[Batch], dict[str, torch.Tensor]]
              ) -> tuple[int, torch.Tensor]:  # fmt: skip
        """Train on every batch; (samples seen, their summed loss as a float64 device tensor)."""
        self.model.train()
        seen, loss_sum = 0, torch.zeros((), dtype=torch.float64, device=self.device)
        for batch in batches:
            targets = torch.tensor(batch["label"], device=self.device)
            loss_sum += self(inputs_of(batch), targets).double() * len(targets)
            seen += len(targets)
        return seen, loss_sum
