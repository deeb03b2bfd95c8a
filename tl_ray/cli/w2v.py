"""`tl-ray w2v train|update|eval`: keep Word2Vec / FastText vectors current with new text."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tl_ray.cli.app import app, emit

w2v_app = typer.Typer(
    name="w2v",
    help="Train, update and evaluate Word2Vec / FastText models (gensim) as Ray tasks.",
    no_args_is_help=True,
)
app.add_typer(w2v_app, name="w2v")

ENCODING = typer.Option("utf-8", help="Corpus text encoding (e.g. cp1252, latin-1).")
LOWERCASE = typer.Option(False, "--lowercase", help="Lower-case the corpus before training.")
ADDRESS = typer.Option(None, help="Ray cluster address; default: local.")


@w2v_app.command("train")
def train_command(
    corpus: Path = typer.Argument(..., help="Text file (one sentence/document a line) or folder."),
    out: Path = typer.Option(..., "--out", help="Where to write the trained .model file."),
    arch: str = typer.Option("word2vec", help="word2vec (CBOW) or fasttext (subword n-grams)."),
    vector_size: int = typer.Option(100, help="Dimensions of each word vector."),
    window: int = typer.Option(5, help="Context window on each side."),
    min_count: int = typer.Option(5, help="Ignore words seen fewer times than this."),
    epochs: int = typer.Option(5, help="Passes over the corpus."),
    workers: int = typer.Option(1, help="Training threads, and the CPUs the Ray task holds."),
    seed: int = typer.Option(0, help="Random seed."),
    skip_gram: bool = typer.Option(False, "--skip-gram", help="Skip-gram instead of CBOW."),
    bucket: int = typer.Option(2_000_000, help="fasttext only: n-gram rows (memory: bucket x size)."),
    encoding: str = ENCODING,
    lowercase: bool = LOWERCASE,
    address: Optional[str] = ADDRESS,
) -> None:
    """Train word vectors on a corpus, streamed, as a Ray task; prints a JSON summary."""
    from tl_ray.extras import require
    from tl_ray.w2v import run_as_task, train_model

    require("word-vectors", "tl-ray w2v")  # before Ray starts
    emit(run_as_task(
        train_model, cpus=workers, address=address, corpus=str(corpus.expanduser().resolve()),
        out=str(out.expanduser().resolve()), arch=arch, vector_size=vector_size, window=window,
        min_count=min_count, epochs=epochs, workers=workers, seed=seed, encoding=encoding,
        lowercase=lowercase, bucket=bucket, skip_gram=skip_gram,
    ))


@w2v_app.command("update")
def update_command(
    model: Path = typer.Argument(..., help="A .model written by `tl-ray w2v train` (not changed)."),
    corpus: Path = typer.Option(..., "--corpus", help="New text: a file or a folder of files."),
    out: Path = typer.Option(..., "--out", help="Where to write the updated model (not MODEL)."),
    epochs: Optional[int] = typer.Option(None, help="Passes over the new text; default: the model's."),
    workers: int = typer.Option(1, help="CPUs the Ray task holds."),
    encoding: str = ENCODING,
    lowercase: bool = LOWERCASE,
    address: Optional[str] = ADDRESS,
) -> None:
    """Add new words and train on new text only; reports words added and how old vectors moved."""
    from tl_ray.extras import require
    from tl_ray.w2v import run_as_task, update_model

    require("word-vectors", "tl-ray w2v")  # before Ray starts
    emit(run_as_task(
        update_model, cpus=workers, address=address,
        model_path=str(model.expanduser().resolve()), corpus=str(corpus.expanduser().resolve()),
        out=str(out.expanduser().resolve()), epochs=epochs, encoding=encoding, lowercase=lowercase,
    ))


@w2v_app.command("eval")
def eval_command(
    model: Path = typer.Argument(..., help="A .model, .kv, .bin, .vec or .txt vectors file."),
) -> None:
    """Score word similarity (WordSim-353, SimLex-999) and analogies; prints JSON."""
    from tl_ray.w2v import evaluate

    emit(evaluate(model))

