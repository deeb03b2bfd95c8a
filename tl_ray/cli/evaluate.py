"""`tl-ray evaluate CHECKPOINT --data FILE|IMAGE_FOLDER`: accuracy, macro-F1 and count as one
JSON object (an image model reads a folder of class sub-folders)."""

from __future__ import annotations

from pathlib import Path

import typer

from tl_ray.cli.app import app, emit


@app.command()
def evaluate(
    checkpoint: Path = typer.Argument(..., help="Checkpoint folder (e.g. OUTPUT/model)."),
    data: Path = typer.Option(..., "--data", help="Labeled file (.csv .tsv .jsonl .parquet .txt) or image folder."),
    text_column: str = typer.Option("text", help="Column holding the text."),
    label_column: str = typer.Option("label", help="Column holding the label."),
    encoding: str = typer.Option("utf-8", help="Text encoding of the file."),
    device: str = typer.Option("auto", help="auto (a CUDA GPU when there is one), cpu, cuda or cuda:N."),
) -> None:
    """Score a checkpoint on a labeled file."""
    from tl_ray.data import encode_labels, read_table
    from tl_ray.serve.predictor import Predictor

    if data.is_dir():  # images: FOLDER/<class>/<image>
        from tl_ray.images import read_image_folder

        table, predictor = read_image_folder(data), Predictor(checkpoint, device=device)
        encoded = encode_labels(table, predictor.labels)
        metrics = predictor.evaluate(encoded["image"].to_pylist(), encoded["label"].to_pylist())
        emit({k: metrics[k] for k in ("accuracy", "f1", "loss", "count")})
        return
    table = read_table(data, text_column=text_column, label_column=label_column, encoding=encoding)
    predictor = Predictor(checkpoint, device=device)
    encoded = encode_labels(table, predictor.labels)
    metrics = predictor.evaluate(encoded["text"].to_pylist(), encoded["label"].to_pylist())
    emit({"accuracy": metrics["accuracy"], "f1": metrics["f1"], "loss": metrics["loss"], "count": metrics["count"]})
