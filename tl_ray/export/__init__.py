"""Model-folder exports for other runtimes: ONNX (issue 15) and `tl-ray export` (issue 16).

Importing this package loads neither torch nor onnx; each imports on use. `RUNTIMES` names
what `Predictor(folder, runtime=...)` runs a model folder with: "torch" (the framework it was
trained in, TensorFlow for keras-image), "onnx" (onnxruntime, exported once and cached), or
"onnx-int8" (the same with dynamically quantized int8 matrix products).

Example:
    >>> check_runtime("onnx")
    'onnx'
    >>> export_onnx("runs/demo/model", "runs/demo/model-onnx")  # doctest: +SKIP
    PosixPath('/.../runs/demo/model-onnx')
    >>> export_model("runs/demo/model", "exports/demo-hf", format="hf")  # doctest: +SKIP
    PosixPath('/.../exports/demo-hf')
"""

from __future__ import annotations

from tl_ray.export.formats import FORMATS, export_model
from tl_ray.export.hf import export_hf
from tl_ray.export.onnx import cached_export, export_onnx, is_onnx_export, require_onnx
from tl_ray.export.savedmodel import export_savedmodel

__all__ = ["FORMATS", "RUNTIMES", "cached_export", "check_runtime", "export_hf", "export_model",
           "export_onnx", "export_savedmodel", "is_onnx_export", "require_onnx"]  # fmt: skip

RUNTIMES = ("torch", "onnx", "onnx-int8")


def check_runtime(runtime: object) -> str:
    """`runtime` if it is one of RUNTIMES, else ValueError in one line (pydantic-friendly).

    >>> check_runtime("tensorrt")
    Traceback (most recent call last):
    ...
    ValueError: runtime must be one of torch, onnx, onnx-int8, got 'tensorrt'
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    return str(runtime)
