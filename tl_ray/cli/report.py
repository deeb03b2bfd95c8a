"""`tl-ray report EXPERIMENT_DIR`: a table of trials and PNG plots."""

from __future__ import annotations

from pathlib import Path

import typer

from tl_ray.cli.app import app


@app.command()
def report(folder: Path = typer.Argument(..., help="A search's output folder.")) -> None:
    """Print the trials (best first, early-stopped ones marked) and write plots."""
    from rich.console import Console
    from rich.table import Table

    from tl_ray.search.report import trial_summary, write_plots

    rows = trial_summary(folder)
    metric = next(k for k in rows[0] if k.startswith("val_")) if rows else "metric"
    keys = sorted({k for r in rows for k in r["params"]})
    short = [k.rsplit(".", 1)[-1] for k in keys]
    headers = short if len(set(short)) == len(short) else keys
    table = Table(title=f"{len(rows)} trials in {folder}")
    for column in ["trial", metric, "epochs", "status", *headers]:
        table.add_column(column, no_wrap=True)
    for r in rows:
        value = "-" if r[metric] is None else f"{r[metric]:.4f}"
        params = [_fmt(r["params"].get(k)) for k in keys]
        table.add_row(str(r["trial"]), value, str(r["epochs"]), r["status"], *params)
    console = Console()
    Console(width=max(console.width, 160) if not console.is_terminal else None).print(table)
    for path in write_plots(folder):
        typer.echo(f"wrote {path}", err=True)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "-" if value is None else str(value)
