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

__all__ = ["ClassificationTally", "macro_f1"]


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
    """Confusion matrix plus summed cross-entropy; `reduce` sums it across workers."""

    def __init__(self, num_labels: int) -> None:
        self.confusion = torch.zeros(num_labels, num_labels, dtype=torch.float64)
        self.loss_sum = torch.zeros(1, dtype=torch.float64)

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.loss_sum += F.cross_entropy(logits.double(), targets, reduction="sum")
        predicted = logits.argmax(dim=-1)
        n = self.confusion.shape[0]
        self.confusion += torch.bincount(targets * n + predicted, minlength=n * n).view(n, n)

    def reduce(self, all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        flat = all_reduce(torch.cat([self.confusion.flatten(), self.loss_sum]))
        n = self.confusion.shape[0]
        self.confusion = flat[: n * n].view(n, n)
        self.loss_sum = flat[n * n :]

    def metrics(self, prefix: str = "") -> dict[str, float]:
        count = float(self.confusion.sum())
        return {
            f"{prefix}loss": float(self.loss_sum) / max(1.0, count),
            f"{prefix}accuracy": float(self.confusion.diag().sum()) / max(1.0, count),
            f"{prefix}f1": macro_f1(self.confusion),
            f"{prefix}count": int(count),
        }
