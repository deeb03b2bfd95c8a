"""Plain-Python inference on a checkpoint folder; no Ray needed.

Text models take strings; image models (`predictor.input_kind == "image"`) take encoded
image bytes (PNG/JPEG), file paths or pixel arrays. `device` picks where the model computes:
"auto" (a CUDA GPU when the framework sees one, else the CPU), "cpu", "cuda" or "cuda:N";
`predictor.device` says which it is ("cpu", "cuda:0"). For TensorFlow models (keras-image)
"auto" is TensorFlow's own choice (its first GPU, else the CPU); an explicit choice pins the
forward pass there with `tf.device`.

`runtime` picks what computes: "torch" (default: the framework the model was trained in),
"onnx" (onnxruntime; a torch model folder is exported once into a versioned cache beside it,
see `tl_ray.export.cached_export`, and an exported folder is run as it is) or "onnx-int8"
(the same, with dynamically quantized int8 matrix products). The ONNX runtimes take the
same texts and give the same scores (within 1e-4 of torch for "onnx"); their session uses
as many intra-op threads as torch does in this process (`torch.get_num_threads()`).

Example:
    >>> predictor = Predictor("runs/demo/model")          # doctest: +SKIP
    >>> predictor.predict(["a gripping, funny film"])[0]  # doctest: +SKIP
    {'label': 'pos', 'score': 0.93, 'probabilities': {'neg': 0.07, 'pos': 0.93}}
    >>> Predictor("runs/demo/model", device="cuda").device  # doctest: +SKIP
    'cuda:0'
    >>> Predictor("runs/demo/model", runtime="onnx").model.providers  # doctest: +SKIP
    ['CPUExecutionProvider']
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, ContextManager

import numpy as np

from tl_ray.errors import CheckpointError, ConfigError
from tl_ray.export import RUNTIMES, check_runtime, is_onnx_export
from tl_ray.serve.api import check_device, check_model_path
from tl_ray.train.checkpoint import (
    LABELS_FILE,
    MANIFEST_FILE,
    TRAIN_STATE_FILE,
    load_model_folder,
    read_manifest,
)

__all__ = ["PICKLE_SUFFIXES", "RUNTIMES", "Predictor", "check_model_folder", "cuda_devices",
           "resolve_device"]  # fmt: skip

# Weights that load by unpickling. A served folder holds safetensors (torch), model.keras or
# model.onnx; train_state.pt (resume state, read with weights_only=True) is never served.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib")


def check_model_folder(folder: str | Path) -> Path:
    """`folder` if it is a tl-ray model folder, else CheckpointError saying why in one line.

    A model folder is a directory (not a file, not a path with `..`) holding a valid
    `manifest.json` (a JSON object of this tl-ray's format_version that names its backbone
    kind) and `labels.json`, and no pickle-format weights (`PICKLE_SUFFIXES`): serving loads
    weights from safetensors, `model.keras` or `model.onnx` only.

    >>> check_model_folder("/no/such/model")
    Traceback (most recent call last):
    tl_ray.errors.CheckpointError: checkpoint folder not found: /no/such/model
    """
    try:
        check_model_path(str(folder))
    except ValueError as error:
        raise CheckpointError(str(error)) from None
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{folder} is a file, not a tl-ray model folder (a folder with {MANIFEST_FILE})")
    pickled = sorted(item.name for item in path.iterdir()
                     if item.suffix.lower() in PICKLE_SUFFIXES and item.name != TRAIN_STATE_FILE) if path.is_dir() else []
    if pickled:
        raise CheckpointError(
            f"{folder} holds pickle-format weights ({', '.join(pickled)}); serving loads "
            "safetensors, model.keras or model.onnx only: re-export the model with tl-ray"
        )
    try:  # a missing folder or manifest: read_manifest says so
        manifest = read_manifest(path)
    except AttributeError:  # JSON, but not an object
        raise CheckpointError(f"{path / MANIFEST_FILE} is not a JSON object") from None
    backbone = manifest.get("backbone")
    if not isinstance(backbone, dict) or not isinstance(backbone.get("kind"), str):
        raise CheckpointError(f"{path / MANIFEST_FILE} names no backbone kind (backbone.kind)")
    if not (path / LABELS_FILE).is_file():
        raise CheckpointError(f"{folder} is not a tl-ray checkpoint: it has no {LABELS_FILE}")
    return path


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
    """Loads a checkpoint folder once and predicts batches of texts (or images) on `device`.

    `model` is the torch/Keras model, or for the ONNX runtimes a
    `tl_ray.export.runtime.OnnxRunner` (its `session` is the onnxruntime.InferenceSession).
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        max_length: int | None = None,
        batch_size: int = 64,
        device: str = "auto",
        runtime: str = "torch",
    ):
        try:
            check_device(device)  # a typo fails before the model loads
            self.runtime = check_runtime(runtime)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        self.folder = check_model_folder(folder)
        if self.runtime == "torch":
            self._load_native(device)
        else:
            self._load_onnx(device, quantize=self.runtime == "onnx-int8")
        self.max_length = max_length or int(self.manifest.get("max_length", 128))
        self.batch_size = batch_size

    def _load_native(self, device: str) -> None:
        if is_onnx_export(self.folder):
            raise ConfigError(f"{self.folder} is an ONNX export; load it with runtime 'onnx' or "
                              "'onnx-int8'")  # fmt: skip
        self.backbone, self.model, self.labels, self.manifest = load_model_folder(self.folder)
        framework = self.backbone.framework
        self.device = resolve_device(device, cuda_devices(framework), framework=framework)
        if hasattr(self.model, "eval"):
            self.model.eval()  # torch: inference mode (Keras models are called with training=False)
        if framework == "torch":
            self.model.to(self.device)

    def _load_onnx(self, device: str, *, quantize: bool) -> None:
        """Export (once, cached) unless the folder is an export, then open an onnxruntime session."""
        import torch

        from tl_ray.export import cached_export, require_onnx
        from tl_ray.export.runtime import CUDA, OnnxRunner

        require_onnx("onnxruntime")
        import onnxruntime as ort

        visible = cuda_devices("torch") if device != "cpu" else 0
        if device == "auto" and CUDA not in ort.get_available_providers():
            visible = 0  # auto: the CPU unless onnxruntime can use the GPU torch sees
        self.device = resolve_device(device, visible, framework="torch")  # before a long export
        exported = self.folder
        if not is_onnx_export(self.folder):
            exported = cached_export(self.folder, quantize=quantize)
        self.model = OnnxRunner(exported, device=self.device, threads=torch.get_num_threads())
        if (self.model.quantization is not None) != quantize:
            have = "onnx-int8" if self.model.quantization else "onnx"
            raise ConfigError(f"{exported} is an {have} export; load it with runtime {have!r}, "
                              f"not {self.runtime!r}")  # fmt: skip
        self.backbone, self.labels = self.model.backbone, self.model.labels
        self.manifest = self.model.manifest
        self.onnx_folder = exported

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
        chunks = [self._chunk_scores(texts[start : start + self.batch_size])
                  for start in range(0, len(texts), self.batch_size)]  # fmt: skip
        return np.concatenate(chunks) if chunks else np.zeros((0, len(self.labels)), np.float32)

    def _chunk_scores(self, texts: list[Any]) -> np.ndarray:
        if self.runtime != "torch":  # onnxruntime on NumPy inputs from the same preprocessing
            return self.model.scores(self.model.preprocess(texts, self.max_length))
        inputs = self.backbone.preprocess(texts, self.max_length)
        with self._placed():  # torch inputs move to the model's device in Backbone.scores
            return self.backbone.scores(self.model, inputs)

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
