"""Per-epoch metrics as TensorBoard event files (written with tensorboardX, which comes with
ray[tune]; the `tensorboard` package, in the `tracking` extra, only views them).

`tl-ray train` writes OUTPUT/tensorboard/<run>/, `tl-ray tune` OUTPUT/tensorboard/trial_<n>/:
`tensorboard --logdir OUTPUT/tensorboard`. Step = epoch, so a resumed run continues its curve.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["TRACKED", "EpochWriter", "sampled_params", "scalars", "tensorboard_dir"]

TRACKED = ("train_loss", "val_loss", "val_accuracy", "val_f1", "lr", "samples_per_s", "epoch_s")
_TUNE_KEYS = ("optuna_trial", "train_run")  # tl-ray's bookkeeping in each Tune trial's config


def tensorboard_dir(output: str | Path) -> Path:
    return Path(output) / "tensorboard"


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The tracked metrics that are finite numbers."""
    out = {}
    for key in TRACKED:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)
    return out


def sampled_params(config: dict[str, Any]) -> dict[str, bool | int | float | str]:
    """A trial's sampled parameters (dotted config keys), as HParams and MLflow take them."""
    return {key: value if isinstance(value, (bool, int, float, str)) else str(value)
            for key, value in sorted(config.items()) if key not in _TUNE_KEYS}  # fmt: skip


class EpochWriter:
    """One TensorBoard run: per-epoch scalars (step = epoch) and, once, its parameters."""

    def __init__(self, logdir: str | Path, params: dict[str, Any] | None = None, metric: str | None = None) -> None:
        from tensorboardX import SummaryWriter
        from tensorboardX.summary import hparams

        self.writer = SummaryWriter(logdir=str(logdir))
        if params:  # HParams dashboard: these parameters against the run's `metric` curve
            for summary in hparams(sampled_params(params), {metric or "val_loss": 0.0}):
                self.writer.file_writer.add_summary(summary)

    def write(self, metrics: dict[str, Any]) -> None:
        step = int(metrics.get("epoch") or 0)
        for key, value in scalars(metrics).items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
