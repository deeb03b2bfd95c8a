"""`tl-ray train CONFIG.yaml [--set key=value ...] [--address ADDR]`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from tl_ray.cli.app import app, emit


def _print_epoch(metrics: dict[str, Any]) -> None:
    typer.echo(
        f"epoch {metrics['epoch']}: train_loss {metrics['train_loss']:.4f}  "
        f"val_loss {metrics['val_loss']:.4f}  val_accuracy {metrics['val_accuracy']:.4f}  "
        f"val_f1 {metrics['val_f1']:.4f}  {metrics['samples_per_s']:.1f} samples/s",
        err=True,
    )


@app.command()
def train(
    config: Path = typer.Argument(..., help="Run config YAML (data, backbone, train, output)."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key: key.path=value."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address; default: local."),
) -> None:
    """Fine-tune a backbone with Ray Train and export the best checkpoint."""
    from tl_ray.config import load_config
    from tl_ray.train.driver import train as run_training

    cfg = load_config(config, set_)
    outcome = run_training(cfg, address=address, on_epoch=_print_epoch)
    emit({"model": str(outcome.model_dir), "checkpoint": outcome.checkpoint_dir, "metrics": outcome.metrics})
