"""`tl-ray predict CHECKPOINT --text "..." [--input FILE]`: JSON lines, no Ray."""

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
) -> None:
    """Print one JSON line per text: label, score and every class probability."""
    from tl_ray.serve.predictor import Predictor

    texts = list(text) + (_read_lines(input_, encoding) if input_ else [])
    if not texts:
        raise DataError("nothing to predict: pass --text or --input")
    predictor = Predictor(checkpoint)
    for item, prediction in zip(texts, predictor.predict(texts)):
        emit({"text": item, **prediction})
