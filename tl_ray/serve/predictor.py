"""Plain-Python inference on a checkpoint folder; no Ray needed.

Text models take strings; image models (`predictor.input_kind == "image"`) take encoded
image bytes (PNG/JPEG), file paths or pixel arrays. `device` picks where the model computes:
"auto" (a CUDA GPU when the framework sees one, else the CPU), "cpu", "cuda" or "cuda:N";
`predictor.device` says which it is ("cpu", "cuda:0"). For TensorFlow models (keras-image)
"auto" is TensorFlow's own choice (its first GPU, else the CPU); an explicit choice pins the
forward pass there with `tf.device`.

Example:
    >>> predictor = Predictor("runs/demo/model")          # doctest: +SKIP
    >>> predictor.predict(["a gripping, funny film"])[0]  # doctest: +SKIP
    {'label': 'pos', 'score': 0.93, 'probabilities': {'neg': 0.07, 'pos': 0.93}}
    >>> Predictor("runs/demo/model", device="cuda").device  # doctest: +SKIP
    'cuda:0'
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, ContextManager

import numpy as np

from tl_ray.errors import ConfigError
from tl_ray.serve.api import check_device
from tl_ray.train.checkpoint import load_model_folder

__all__ = ["Predictor", "cuda_devices", "resolve_device"]


def resolve_device(device: str, visible: int, *, framework: str = "torch") -> str:
    """The device a choice means when `visible` CUDA GPUs are visible: "cpu" or "cuda:N".

    "auto" is the first GPU if there is one, else the CPU; "cuda" is "cuda:0". Asking for a
    GPU that is not there is a ConfigError.

    >>> resolve_device("auto", 0), resolve_device("auto", 2), resolve_device("cuda", 1)
    ('cpu', 'cuda:0', 'cuda:0')
    """
    try:
        check_device(device)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if device == "cpu" or (device == "auto" and visible == 0):
        return "cpu"
    index = int(device.partition(":")[2] or 0)
    if visible == 0:
        shown = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={shown!r})" if shown is not None else ""
        raise ConfigError(
            f"device {device!r}: {framework} sees no CUDA GPU{where}; "
            "use device 'cpu' or 'auto', or install a CUDA build of " + framework
        )
    if index >= visible:
        last = f"cuda:{visible - 1}"
        raise ConfigError(f"device {device!r}: {framework} sees {visible} CUDA GPU(s), cuda:0..{last}")
    return f"cuda:{index}"


def cuda_devices(framework: str = "torch") -> int:
    """How many CUDA GPUs `framework` ("torch" or "tensorflow") can use in this process."""
    if framework == "tensorflow":
        import tensorflow as tf

        return len(tf.config.list_physical_devices("GPU"))
    import torch

    return max(torch.cuda.device_count(), 1) if torch.cuda.is_available() else 0  # available: >= 1


class Predictor:
    """Loads a checkpoint folder once and predicts batches of texts (or images) on `device`."""

    def __init__(
        self,
        folder: str | Path,
        *,
        max_length: int | None = None,
        batch_size: int = 64,
        device: str = "auto",
    ):
        try:
            check_device(device)  # a typo fails before the model loads
        except ValueError as error:
            raise ConfigError(str(error)) from None
        self.folder = Path(folder)
        self.backbone, self.model, self.labels, self.manifest = load_model_folder(self.folder)
        framework = self.backbone.framework
        self.device = resolve_device(device, cuda_devices(framework), framework=framework)
        if hasattr(self.model, "eval"):
            self.model.eval()  # torch: inference mode (Keras models are called with training=False)
        if framework == "torch":
            self.model.to(self.device)
        self.max_length = max_length or int(self.manifest.get("max_length", 128))
        self.batch_size = batch_size

    def _placed(self) -> ContextManager[Any]:
        """TensorFlow: pin the forward pass to `device`; torch models were moved already."""
        if self.backbone.framework != "tensorflow":
            return contextlib.nullcontext()
        import tensorflow as tf

        return tf.device("/CPU:0" if self.device == "cpu" else "/GPU:" + self.device.partition(":")[2])

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
            with self._placed():  # torch inputs move to the model's device in Backbone.scores
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
