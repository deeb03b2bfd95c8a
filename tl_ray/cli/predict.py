"""`tl-ray predict CHECKPOINT --text "..." [--input FILE] | --image FILE ...`: JSON lines, no Ray."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tl_ray.cli.app import app, emit
from tl_ray.errors import DataError


def _read_lines(path: Path, encoding: str) -> list[str]:
    if not path.is_file():
        raise DataError(f"input file not found: {path}")
    try:
        lines = path.read_text(encoding=encoding).splitlines()
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path}: bytes at offset {error.start} are not valid {encoding}; pass --encoding"
        ) from None
    return [line for line in lines if line.strip()]


@app.command()
def predict(
    checkpoint: Path = typer.Argument(..., help="Checkpoint folder (e.g. OUTPUT/model)."),
    text: list[str] = typer.Option([], "--text", help="A text to classify (repeatable)."),
    input_: Optional[Path] = typer.Option(None, "--input", help="File with one text per line."),
    encoding: str = typer.Option("utf-8", help="Encoding of --input."),
    image: list[Path] = typer.Option([], "--image", help="An image file (PNG/JPEG) to classify (repeatable)."),
    device: str = typer.Option("auto", help="auto (a CUDA GPU if there is one), cpu, cuda or cuda:N."),
) -> None:
    """Print one JSON line per text or image: label, score and every class probability."""
    from tl_ray.serve.predictor import Predictor

    texts = list(text) + (_read_lines(input_, encoding) if input_ else [])
    if image and texts:
        raise DataError("pass texts (--text/--input) or images (--image), not both")
    if image:
        _predict_images(checkpoint, image, device)
        return
    if not texts:
        raise DataError("nothing to predict: pass --text, --input or --image")
    predictor = Predictor(checkpoint, device=device)
    if predictor.input_kind != "text":
        raise DataError(f"{checkpoint} classifies {predictor.input_kind}s; pass --image FILE")
    for item, prediction in zip(texts, predictor.predict(texts)):
        emit({"text": item, **prediction})


def _predict_images(checkpoint: Path, files: list[Path], device: str) -> None:
    from tl_ray.serve.predictor import Predictor

    for file in files:
        if not file.is_file():
            raise DataError(f"image file not found: {file}")
    predictor = Predictor(checkpoint, device=device)
    if predictor.input_kind != "image":
        raise DataError(f"{checkpoint} classifies {predictor.input_kind}; pass --text or --input")
    # paths, not bytes: a file that does not decode is named in the error
    for file, prediction in zip(files, predictor.predict([str(file) for file in files])):
        emit({"image": str(file), **prediction})
