"""Classification metrics that add up across batches and workers.

Example:
    >>> import torch
    >>> tally = ClassificationTally(2)
    >>> tally.add(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
    >>> tally.metrics()["accuracy"]
    0.5
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["ClassificationTally", "all_reduce_sum", "macro_f1"]


def all_reduce_sum(tensor: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """`tensor` summed over the process group, carried on `device` (returned there).

    The device must be the backend's: NCCL (`use_gpu`) reduces only CUDA tensors, gloo CPU
    ones, so a Train loop passes `ray.train.torch.get_device()`. Without a process group
    (one worker, or plain Python) the tensor comes back unchanged, on `device`.

    >>> all_reduce_sum(torch.tensor([1.0, 2.0]), "cpu").tolist()
    [1.0, 2.0]
    """
    on_device = tensor if device is None else tensor.to(device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(on_device)
    return on_device


def macro_f1(confusion: torch.Tensor) -> float:
    """Unweighted mean F1 over the classes that occur in truth or prediction."""
    confusion = confusion.double()
    true_pos = confusion.diag()
    predicted = confusion.sum(0)
    actual = confusion.sum(1)
    present = (predicted + actual) > 0
    f1 = 2 * true_pos / (predicted + actual).clamp(min=1)
    return float(f1[present].mean()) if present.any() else 0.0


class ClassificationTally:
    """Confusion matrix plus summed cross-entropy; `reduce` sums it across workers.

    The tally lives on `device` (the training device): logits are added where they were
    computed, and `reduce` hands the collective a tensor on that device.
    """

    def __init__(self, num_labels: int, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device or "cpu")
        self.confusion = torch.zeros(num_labels, num_labels, dtype=torch.float64, device=self.device)
        self.loss_sum = torch.zeros(1, dtype=torch.float64, device=self.device)

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        logits, targets = logits.to(self.device), targets.to(self.device)
        self.loss_sum += F.cross_entropy(logits.double(), targets, reduction="sum")
        predicted = logits.argmax(dim=-1)
        ones = torch.ones_like(targets, dtype=self.confusion.dtype)
        self.confusion.index_put_((targets, predicted), ones, accumulate=True)

    def reduce(self, all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Sum across workers with `all_reduce` (given a tensor on this tally's device)."""
        flat = all_reduce(torch.cat([self.confusion.flatten(), self.loss_sum])).to(self.device)
        n = self.confusion.shape[0]
        self.confusion = flat[: n * n].view(n, n)
        self.loss_sum = flat[n * n :]

    def metrics(self, prefix: str = "") -> dict[str, float]:
        confusion = self.confusion.cpu()
        count = float(confusion.sum())
        return {
            f"{prefix}loss": float(self.loss_sum.sum()) / max(1.0, count),
            f"{prefix}accuracy": float(confusion.diag().sum()) / max(1.0, count),
            f"{prefix}f1": macro_f1(confusion),
            f"{prefix}count": int(count),
        }
