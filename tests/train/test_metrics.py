"""Metrics agree with scikit-learn and add up across workers."""

from __future__ import annotations

import torch
from sklearn.metrics import accuracy_score, f1_score

from tl_ray.train.metrics import ClassificationTally


def test_tally_matches_sklearn_and_reduces():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 3, generator=generator)
    targets = torch.randint(0, 3, (50,), generator=generator)
    whole = ClassificationTally(3)
    whole.add(logits, targets)
    halves = [ClassificationTally(3), ClassificationTally(3)]
    halves[0].add(logits[:20], targets[:20])
    halves[1].add(logits[20:], targets[20:])
    summed = halves[0].confusion.flatten().tolist() + halves[0].loss_sum.tolist()
    halves[1].reduce(lambda t: t + torch.tensor(summed, dtype=t.dtype))
    predicted = logits.argmax(-1)
    for tally in (whole, halves[1]):
        metrics = tally.metrics()
        assert metrics["count"] == 50
        assert abs(metrics["accuracy"] - accuracy_score(targets, predicted)) < 1e-9
        assert abs(metrics["f1"] - f1_score(targets, predicted, average="macro")) < 1e-9
        expected_loss = torch.nn.functional.cross_entropy(logits.double(), targets).item()
        assert abs(metrics["loss"] - expected_loss) < 1e-9
