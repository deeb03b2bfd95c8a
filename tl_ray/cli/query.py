"""`tl-ray query URL "text" ...`: ask a running endpoint; one JSON line per text."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from tl_ray.cli.app import app, emit
from tl_ray.errors import DataError


@app.command()
def query(
    url: str = typer.Argument(..., help="Endpoint, e.g. http://127.0.0.1:8000"),
    texts: list[str] = typer.Argument(None, help="Texts to classify."),
    token_file: Optional[Path] = typer.Option(None, help="Bearer token file (else $TL_RAY_SERVE_TOKEN)."),
    timeout: float = typer.Option(30.0, help="Seconds per attempt."),
    retries: int = typer.Option(3, help="Retries on 503 or a refused connection."),
    model: bool = typer.Option(False, "--model", help="Print the served model's description."),
    wait: float = typer.Option(0.0, help="First wait up to this many seconds for /healthz."),
) -> None:
    """Print one JSON line per text: label, score and every class probability."""
    from tl_ray.client import Client

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    if not texts and not model:
        raise DataError('nothing to query: pass texts, e.g. tl-ray query URL "a fine film"')
    with Client(url, token_file=token_file, timeout=timeout, retries=retries) as client:
        if wait > 0:
            client.wait_ready(wait)
        if model:
            emit(client.model())
            return
        for text, prediction in zip(texts, client.predict(list(texts))):
            emit({"text": text, **prediction})
