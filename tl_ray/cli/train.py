"""`tl-ray train CONFIG.yaml [--set key=value ...] [--address ADDR]`."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any, Optional

import typer

from tl_ray.cli import signals
from tl_ray.cli.app import app, emit
from tl_ray.errors import TLRayError


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
    """Fine-tune a backbone with Ray Train and export the best checkpoint.

    Ctrl-C or SIGTERM stops the run; its checkpoints stay.
    """
    from ray.exceptions import RayActorError

    from tl_ray.config import load_config
    from tl_ray.train.driver import train as run_training

    cfg = load_config(config, set_)
    signals.quiet_disk_errors()
    try:
        with signals.sigterm_as_sigint():  # SIGTERM aborts the run as Ctrl-C does (Train's handler)
            outcome = run_training(cfg, address=address, on_epoch=_print_epoch)
    except TLRayError:
        raise
    except (KeyboardInterrupt, SystemExit, RayActorError) as error:
        # Train's SIGINT handler aborts the run's controller, then exits (SystemExit) or the
        # driver finds the controller gone (RayActorError); without a signal that is a crash.
        stop = (signals.received() or [None])[-1]
        if stop is None and isinstance(error, RayActorError):
            raise
        stop = signal.Signals(stop or signal.SIGINT)
        typer.echo(f"interrupted ({stop.name}): training stopped; the checkpoints it reported are "
                   f"under {_storage(cfg)}, no model was exported", err=True)  # fmt: skip
        raise typer.Exit(signals.EXIT_CODES[stop]) from None
    except Exception as error:
        if signals.disk_full(error):
            raise TLRayError(
                f"no space left on device while writing the run ({_storage(cfg)}): free space "
                "there or point output / storage_path elsewhere; no model was exported"
            ) from None
        raise
    emit({"model": str(outcome.model_dir), "checkpoint": outcome.checkpoint_dir, "metrics": outcome.metrics})


def _storage(cfg: Any) -> str:
    output = str(Path(cfg.output).expanduser().resolve())
    return output if not cfg.storage_path else f"{output}, checkpoints in {cfg.storage_path}"
