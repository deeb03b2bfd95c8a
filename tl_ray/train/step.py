"""The torch loop's optimisation: AdamW over the backbone's parameter groups, a linear warmup
schedule, and the training step itself (no Ray in here).

`loop.py` runs it in every worker; `benchmarks/train_throughput.py` runs the very same step
for its plain single-process figure, so the benchmark measures this code, not a copy.

Example:
    >>> step = TrainStep.build(backbone, model, model, cfg, total_steps=100, device=device)  # doctest: +SKIP
    >>> seen, loss_sum = step.epoch(batches, inputs_of)                                      # doctest: +SKIP
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, ContextManager, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TrainStep", "autocast_for", "linear_warmup", "linear_warmup_factor"]

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


def linear_warmup(optimizer: torch.optim.Optimizer, total_steps: int,
                  warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:  # fmt: skip
    """A LambdaLR over `linear_warmup_factor`, warming up for `int(total_steps * warmup_ratio)`
    steps.

    Its state (the step count) goes into a checkpoint's `train_state.pt`, so a resumed run
    continues the schedule where it stopped.
    """
    warmup_steps = int(total_steps * warmup_ratio)
    factor = partial(linear_warmup_factor, warmup_steps=warmup_steps, total_steps=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast_for(device: torch.device) -> ContextManager[Any]:
    """bfloat16 autocast on CUDA, nothing elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@dataclass
class TrainStep:
    """One optimisation step of the torch loop, and an epoch of them.

    A step: forward (under autocast on CUDA), cross-entropy, backward, grad-norm clip, AdamW
    step, schedule step.
    """

    backbone: Any
    model: nn.Module  # what the forward pass runs: the DDP wrapper in a worker group
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    trainable: list[nn.Parameter]
    grad_clip: float | None
    device: torch.device

    @classmethod
    def build(cls, backbone: Any, model: nn.Module, wrapped: nn.Module, cfg: Any, *,
              total_steps: int, device: torch.device) -> TrainStep:  # fmt: skip
        """AdamW over `backbone.param_groups(model, ...)` (after `apply_unfreeze`) and the schedule."""
        tcfg = cfg.train
        lr_decay = getattr(cfg.backbone, "lr_decay", 1.0)
        groups = backbone.param_groups(model, tcfg.lr, tcfg.weight_decay, lr_decay)
        optimizer = torch.optim.AdamW(groups)
        return cls(backbone, wrapped, optimizer, linear_warmup(optimizer, total_steps, tcfg.warmup_ratio),
                   [p for group in groups for p in group["params"]], tcfg.grad_clip, device)  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

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
