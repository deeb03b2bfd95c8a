"""Plain-Python inference on a checkpoint folder; no Ray needed.

Text models take strings; image models (`predictor.input_kind == "image"`) take encoded
image bytes (PNG/JPEG), file paths or pixel arrays.

Example:
    >>> predictor = Predictor("runs/demo/model")          # doctest: +SKIP
    >>> predictor.predict(["a gripping, funny film"])[0]  # doctest: +SKIP
    {'label': 'pos', 'score': 0.93, 'probabilities': {'neg': 0.07, 'pos': 0.93}}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tl_ray.train.checkpoint import load_model_folder

__all__ = ["Predictor"]


class Predictor:
    """Loads a checkpoint folder once and predicts batches of texts (or images)."""

    def __init__(self, folder: str | Path, *, max_length: int | None = None, batch_size: int = 64):
        self.folder = Path(folder)
        self.backbone, self.model, self.labels, self.manifest = load_model_folder(self.folder)
        if hasattr(self.model, "eval"):
            self.model.eval()  # torch: inference mode (Keras models are called with training=False)
        self.max_length = max_length or int(self.manifest.get("max_length", 128))
        self.batch_size = batch_size

    @property
    def input_kind(self) -> str:
        """"text" or "image": what `predict` takes."""
        return self.backbone.input_kind

    def logits(self, texts: list[Any]) -> Any:
        """Raw class scores: a float torch.Tensor for torch families, else as `scores`."""
        scores = self.scores(texts)
        if self.backbone.framework == "torch":
            import torch

            return torch.from_numpy(scores)
        return scores

    def scores(self, texts: list[Any]) -> np.ndarray:
        """Raw class scores (float32 NumPy), computed in chunks of `batch_size`."""
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            inputs = self.backbone.preprocess(texts[start : start + self.batch_size], self.max_length)
            chunks.append(self.backbone.scores(self.model, inputs))
        return np.concatenate(chunks) if chunks else np.zeros((0, len(self.labels)), np.float32)

    def predict(self, texts: list[Any]) -> list[dict[str, Any]]:
        """Label, its probability, and every class's probability, per text (or image)."""
        logits = self.scores(list(texts)).astype(np.float64)
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=-1, keepdims=True)
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

    def evaluate(self, texts: list[Any], label_ids: list[int]) -> dict[str, float]:
        """Accuracy, macro-F1, loss and count against encoded labels."""
        import torch

        from tl_ray.train.metrics import ClassificationTally

        tally = ClassificationTally(len(self.labels))
        logits = torch.from_numpy(self.scores(list(texts)))
        tally.add(logits, torch.as_tensor(label_ids, dtype=torch.long))
        return tally.metrics()
