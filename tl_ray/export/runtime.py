"""Run an ONNX model folder (see `tl_ray.export.onnx`) with onnxruntime.

`OnnxRunner` reads the folder alone: the session (CPUExecutionProvider, or
CUDAExecutionProvider for a "cuda:N" device), the labels, the manifest, and the same
preprocessing as the torch path (the backbone's tokenizer call, or the word-vectors
vocabulary's `encode`), fed to the session as NumPy arrays.

Example:
    >>> runner = OnnxRunner("runs/demo/model-onnx", device="cpu", threads=1)  # doctest: +SKIP
    >>> runner.scores(runner.preprocess(["a fine film"], 128)).shape         # doctest: +SKIP
    (1, 2)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from tl_ray.errors import CheckpointError, ConfigError
from tl_ray.export.onnx import ONNX_FILE, require_onnx

__all__ = ["OnnxRunner", "new_session", "onnx_providers"]

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def onnx_providers(device: str) -> list[Any]:
    """The execution providers for a resolved device ("cpu" or "cuda:N")."""
    if device == "cpu":
        return [CPU]
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        raise ConfigError(f"device {device!r}: onnxruntime {ort.__version__} has no {CUDA} "
                          "(pip install onnxruntime-gpu), or use device 'cpu'")  # fmt: skip
    return [(CUDA, {"device_id": int(device.partition(":")[2] or 0)}), CPU]


def new_session(path: str | Path, device: str, threads: int) -> Any:
    """An onnxruntime.InferenceSession on `device` with `threads` intra-op threads."""
    require_onnx("onnxruntime")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, int(threads))
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=onnx_providers(device))
    except (RuntimeError, ValueError) as error:  # onnxruntime's own errors derive from these
        first = (str(error).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path}: onnxruntime cannot load it ({first})") from None
    if device != "cpu" and CUDA not in session.get_providers():  # ORT falls back silently
        raise ConfigError(f"device {device!r}: onnxruntime could not start {CUDA} "
                          "(CUDA/cuDNN libraries missing?); use device 'cpu'")  # fmt: skip
    return session


class OnnxRunner:
    """An exported folder, loaded: `preprocess` texts, then `scores` them in the session."""

    def __init__(self, folder: str | Path, *, device: str = "cpu", threads: int = 1) -> None:
        from tl_ray.data import LabelMap
        from tl_ray.train.checkpoint import read_manifest

        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        if "onnx" not in self.manifest:
            raise CheckpointError(f"{self.folder} is not an ONNX export: its manifest has no 'onnx'")
        self.labels = LabelMap.load(self.folder / "labels.json")
        self.device = device
        self.session = new_session(self.folder / ONNX_FILE, device, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.backbone, self._encode = _preprocessing(self.folder, self.manifest)

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    @property
    def quantization(self) -> str | None:
        return self.manifest["onnx"].get("quantization")

    def preprocess(self, texts: list[str], max_length: int) -> dict[str, np.ndarray]:
        return self._encode(list(texts), max_length)

    def scores(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """float32 logits (batch, classes) for a preprocessed batch."""
        missing = [name for name in self.input_names if name not in inputs]
        if missing:
            raise CheckpointError(f"{self.folder}: the ONNX graph needs inputs {missing}, "
                                  f"preprocess gave {sorted(inputs)}")  # fmt: skip
        feed = {name: np.ascontiguousarray(inputs[name]) for name in self.input_names}
        return np.asarray(self.session.run(["logits"], feed)[0], dtype=np.float32)


def _preprocessing(folder: Path, manifest: dict[str, Any]) -> tuple[Any, Any]:
    """(backbone object, texts -> NumPy inputs) from the exported folder's assets alone."""
    from tl_ray.backbones.registry import get_backbone
    from tl_ray.config import parse_backbone

    config = dict(manifest["backbone"])
    if config.get("kind") == "hf-text":
        config["name_or_path"] = str(folder)  # the tokenizer was saved here
        backbone = get_backbone(parse_backbone(config))

        def encode(texts: list[str], max_length: int) -> dict[str, np.ndarray]:
            return {k: v.numpy() for k, v in backbone.preprocess(texts, max_length).items()}

        return backbone, encode
    backbone = get_backbone(parse_backbone(config))
    vocab = _vocab(folder)
    return backbone, vocab.encode


def _vocab(folder: Path) -> Any:
    """The word-vectors vocabulary saved by `WordVectorsBackbone.save` (n-grams for subword)."""
    from tl_ray.backbones.word_vectors_io import Vocab

    try:
        meta = json.loads((folder / "word_vectors.json").read_text(encoding="utf-8"))
        ngrams = None
        if meta["oov"] == "subword":
            from safetensors.numpy import load_file

            ngrams = load_file(str(folder / "ngrams.safetensors"))["ngrams"]
        return Vocab(meta["words"], meta["oov"], meta["lowercase"], meta["min_n"], meta["max_n"], ngrams)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{folder}: cannot read the word-vectors vocabulary ({error})") from None
