"""Plain helpers the tests import (fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from tl_ray.net import free_port

__all__ = ["TL_RAY", "cli_lines", "free_port", "json_lines", "make_sentiment_rows", "run_cli",
           "run_tl_ray", "write_csv"]  # fmt: skip

TL_RAY = [sys.executable, "-m", "tl_ray"]  # the real `tl-ray` executable, in this venv

POSITIVE = "good great wonderful superb delightful moving brilliant charming".split()
NEGATIVE = "bad awful boring dull terrible clumsy tedious weak".split()
FILLER = "the film plot actors story scenes was is a and with its".split()


def make_sentiment_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Learnable toy sentiment: each text mixes filler with words of one polarity."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.sample(FILLER, 5) + rng.sample(POSITIVE if label == "pos" else NEGATIVE, 2)
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path



def json_lines(text: str) -> list[dict]:
    """The JSON objects among the lines of `text` (log lines and other output skipped)."""
    found = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                found.append(json.loads(line))
    return [item for item in found if isinstance(item, dict)]


def run_cli(argv: Sequence[object]) -> tuple[int, list[dict]]:
    """Run `tl-ray *argv` in this process: its exit code and the JSON lines it printed.

    Only stdout is captured; stderr stays with pytest (read it with `capsys`).

    >>> code, lines = run_cli(["predict", "runs/demo/model", "--text", "fine"])  # doctest: +SKIP
    """
    from tl_ray.cli.app import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(arg) for arg in argv])
    return code, json_lines(out.getvalue())


def cli_lines(*argv: object) -> list[dict]:
    """The JSON lines of `tl-ray *argv`, run in this process; it must exit 0."""
    code, lines = run_cli(argv)
    assert code == 0, (argv, code)
    return lines


def run_tl_ray(*args: object, cwd: Path | None = None, env: dict[str, str] | None = None,
               timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess:  # fmt: skip
    """Run the real `tl-ray` executable in a child process, its output captured as text;
    with `check`, it must exit 0 (else the end of its stderr is shown)."""
    done = subprocess.run([*TL_RAY, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)  # fmt: skip
    assert not check or done.returncode == 0, done.stderr[-3000:]
    return done


class LocalSession:
    """A loop session of one worker in this process (no Ray Train), for `run_torch_loop`:
    reports kept in `reports`, each checkpoint folder copied to ROOT/epoch-N, resumed from
    the folder `resume` when given."""

    rank, world, distributed = 0, 1, False

    def __init__(self, tables: dict[str, Any], root: Path, resume: Path | None = None) -> None:
        import torch

        self.device = torch.device("cpu")
        self.tables, self.root, self.resume = tables, root, resume
        self.reports: list[dict[str, Any]] = []

    def shard(self, name: str) -> Any:
        from tl_ray.train.session import TableShard

        return TableShard(self.tables[name])

    def checkpoint(self) -> Any:
        import ray.train

        return None if self.resume is None else ray.train.Checkpoint.from_directory(str(self.resume))

    def prepare_model(self, model: Any) -> Any:
        return model

    def report(self, metrics: dict[str, Any], folder: Path | None = None) -> None:
        import shutil

        self.reports.append(metrics)
        if folder is not None:
            shutil.copytree(folder, self.root / f"epoch-{metrics['epoch']}")
