"""`tl-ray export MODEL --format hf|onnx|savedmodel --out DIR`: a model folder for another runtime.

Prints one JSON line: {"format", "model", "out", "files"}. The export is written beside DIR
and renamed into place; an existing non-empty DIR is replaced only with `--force`.

Example:
    tl-ray export runs/demo/model --format hf --out exports/demo-hf
    tl-ray export runs/demo/model --format onnx --quantize int8 --out exports/demo-onnx
    tl-ray export runs/digits/model --format savedmodel --out models/digits/1
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tl_ray.cli.app import app, emit
from tl_ray.errors import ConfigError


@app.command()
def export(
    model: Path = typer.Argument(..., help="Model folder (e.g. OUTPUT/model)."),
    format_: str = typer.Option(..., "--format", help="hf (hf-text), onnx (hf-text, word-vectors) "
                                "or savedmodel (keras-image)."),  # fmt: skip
    out: Path = typer.Option(..., "--out", help="Folder to write (outside MODEL)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out folder."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="int8: dynamic int8 "
                                           "matrix products (--format onnx)."),  # fmt: skip
) -> None:
    """Export a trained model folder as a transformers folder, ONNX or a TensorFlow SavedModel."""
    from tl_ray.export.formats import export_model, listed_files

    if quantize not in (None, "int8"):
        raise ConfigError(f"--quantize must be int8, got {quantize!r}")
    target = export_model(model, out, format=format_, force=force, quantize=quantize == "int8")
    emit({"format": format_, "model": str(model.expanduser().resolve()), "out": str(target),
          "files": listed_files(target)})  # fmt: skip
