"""Plain-Python inference on a checkpoint folder; no Ray needed.

Example:
    >>> predictor = Predictor("runs/demo/model")          # doctest: +SKIP
    >>> predictor.predict(["a gripping, funny film"])[0]  # doctest: +SKIP
    {'label': 'pos', 'score': 0.93, 'probabilities': {'neg': 0.07, 'pos': 0.93}}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tl_ray.train.checkpoint import load_model_folder
from tl_ray.train.metrics import ClassificationTally

__all__ = ["Predictor"]


class Predictor:
    """Loads a checkpoint folder once and predicts batches of texts."""

    def __init__(self, folder: str | Path, *, max_length: int | None = None, batch_size: int = 64):
        self.folder = Path(folder)
        self.backbone, self.model, self.labels, self.manifest = load_model_folder(self.folder)
        self.model.eval()
        self.max_length = max_length or int(self.manifest.get("max_length", 128))
        self.batch_size = batch_size

    @torch.no_grad()
    def logits(self, texts: list[str]) -> torch.Tensor:
        """Raw class scores, computed in chunks of `batch_size`."""
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            inputs = self.backbone.preprocess(texts[start : start + self.batch_size], self.max_length)
            chunks.append(self.backbone.logits(self.model, inputs).float())
        return torch.cat(chunks) if chunks else torch.zeros(0, len(self.labels))

    def predict(self, texts: list[str]) -> list[dict[str, Any]]:
        """Label, its probability, and every class's probability, per text."""
        probabilities = torch.softmax(self.logits(list(texts)), dim=-1)
        results = []
        for row in probabilities.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            results.append(
                {
                    "label": self.labels.labels[best],
                    "score": row[best],
                    "probabilities": dict(zip(self.labels.labels, row)),
                }
            )
        return results

    def evaluate(self, texts: list[str], label_ids: list[int]) -> dict[str, float]:
        """Accuracy, macro-F1, loss and count against encoded labels."""
        tally = ClassificationTally(len(self.labels))
        tally.add(self.logits(list(texts)), torch.as_tensor(label_ids, dtype=torch.long))
        return tally.metrics()
