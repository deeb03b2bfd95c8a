"""Plain helpers the tests import (fixtures live in conftest.py)."""

from __future__ import annotations

import csv
import random
from pathlib import Path

from tl_ray.net import free_port

__all__ = ["free_port", "make_sentiment_rows", "write_csv"]

POSITIVE = "good great wonderful superb delightful moving brilliant charming".split()
NEGATIVE = "bad awful boring dull terrible clumsy tedious weak".split()
FILLER = "the film plot actors story scenes was is a and with its".split()


def make_sentiment_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Learnable toy sentiment: each text mixes filler with words of one polarity."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.sample(FILLER, 5) + rng.sample(POSITIVE if label == "pos" else NEGATIVE, 2)
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path

