"""Where a training loop runs: a Ray Train worker, or a Ray Tune trial's own process.

The per-worker loops (`loop.py`, `keras_loop.py`) touch Ray only through a session: their
rank and world size, their data shard, the checkpoint to resume from, and `report`.

- `TrainSession`: inside a Ray Train worker (TorchTrainer / TensorflowTrainer), every call
  is Ray Train's own (`ray.train.get_dataset_shard`, `ray.train.report`, ...).
- `TrialSession`: one worker run directly in a Tune trial's process, with no Train controller,
  worker group or Ray Data pipeline to start. The trial reserves the worker's CPUs (and GPU).
  Its data are the in-memory tables; its checkpoints go to the same storage layout a Train
  run uses (`STORAGE/trials/<run>/checkpoint_*`, best `keep` by the metric plus the latest,
  see `CheckpointStore`), so a retried trial resumes from its last checkpoint exactly as a
  Train run of the same name does, and each report reaches Tune with `ray.tune.report` and
  the checkpoint's path (as Ray's `TuneReportCallback` does for a Train run).

Example:
    >>> session = TrialSession({"train": table, "validation": table}, store, cpus=1)  # doctest: +SKIP
    >>> run_torch_loop(config, session)                                              # doctest: +SKIP
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from tl_ray import storage

__all__ = ["CheckpointStore", "TableShard", "TrainSession", "TrialSession", "report_epoch", "trial_device"]

INDEX_FILE = "tl_ray_checkpoints.json"
MARKER = "manifest.json"  # a checkpoint folder is whole once its manifest is there


class TrainSession:
    """The loop inside a Ray Train worker: every call is Ray Train's."""

    distributed = True  # a worker group: collectives across the workers (even of one)

    def __init__(self) -> None:
        import ray.train

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()

    @property
    def device(self):
        import ray.train.torch

        return ray.train.torch.get_device()  # NCCL's device under use_gpu, else the CPU

    def shard(self, name: str) -> Any:
        import ray.train

        return ray.train.get_dataset_shard(name)

    def checkpoint(self) -> Any:
        import ray.train

        return ray.train.get_checkpoint()

    def prepare_model(self, model: Any) -> Any:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)  # moves to the device; DDP when world > 1

    def report(self, metrics: dict[str, Any], folder: Path | None = None) -> None:
        import ray.train

        checkpoint = None if folder is None else ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)


class TableShard:
    """An in-memory table with the `iter_batches` of a Ray Data shard (numpy batches).

    With a seed every epoch sees the whole table in a fresh random order (a full shuffle,
    where Ray Data's local shuffle mixes within a buffer).

    >>> shard = TableShard(pa.table({"x": [1, 2, 3]}))
    >>> [b["x"].tolist() for b in shard.iter_batches(batch_size=2)]
    [[1, 2], [3]]
    """

    def __init__(self, table: pa.Table) -> None:
        self.table = table

    def iter_batches(
        self,
        *,
        batch_size: int,
        batch_format: str = "numpy",
        local_shuffle_buffer_size: int | None = None,
        local_shuffle_seed: int | None = None,
    ) -> Iterator[dict[str, np.ndarray]]:
        if batch_format != "numpy":
            raise ValueError(f"TableShard gives numpy batches, not {batch_format!r}")
        rows = self.table.num_rows
        shuffled = local_shuffle_buffer_size is not None or local_shuffle_seed is not None
        order = np.random.default_rng(local_shuffle_seed).permutation(rows) if shuffled else None
        for start in range(0, rows, batch_size):
            part = (self.table.slice(start, batch_size) if order is None
                    else self.table.take(order[start : start + batch_size]))  # fmt: skip
            yield {name: np.array(part.column(name).to_numpy(zero_copy_only=False))  # writable
                   for name in part.column_names}  # fmt: skip


def report_epoch(
    session: Any, metrics: dict[str, Any], *, backbone: Any, model: Any, labels: Any, epoch: int,
    cfg: Any, extra: dict[str, Any], state: dict[str, Any] | None = None,
) -> None:
    """Report one epoch's metrics; rank 0 attaches a checkpoint folder: servable (weights,
    labels, a manifest with `extra` and the train config) and, with `state` (the torch loop's
    optimizer, scheduler and epoch), resumable from its `train_state.pt`.

    Both loops end an epoch with it (`loop.py`, `keras_loop.py`); the folder is a temp folder
    that the session copies to its storage before this returns.
    """
    from tl_ray.train.checkpoint import TRAIN_STATE_FILE, write_model_folder

    if session.rank != 0:
        session.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="tl-ray-ckpt-") as tmp:
        folder = Path(tmp)
        write_model_folder(folder, backbone, model, labels, metrics=metrics, epoch=epoch,
                           extra={**extra, "train": cfg.train.model_dump()})  # fmt: skip
        if state is not None:
            import torch

            torch.save(state, folder / TRAIN_STATE_FILE)
        session.report(metrics, folder)


def trial_device(gpu_ids: list[Any]):
    """The torch device of a trial that Ray gave `gpu_ids` (it sets CUDA_VISIBLE_DEVICES to
    them, so the first is `cuda:0` in this process), else the CPU.

    >>> trial_device([]).type, str(trial_device(["3"]))
    ('cpu', 'cuda:0')
    """
    import torch

    return torch.device("cuda", 0) if gpu_ids else torch.device("cpu")


class CheckpointStore:
    """A run's checkpoints at `location` (a path or a URI): `keep` best by `metric`, and the latest.

    The index (`tl_ray_checkpoints.json`) is written after the checkpoint folder it names is
    whole, and a folder leaves the index before it is deleted, so a reader never meets a
    listed checkpoint that is half there.
    """

    def __init__(self, location: str, *, keep: int, metric: str, mode: str) -> None:
        self.location, self.keep, self.metric, self.mode = location.rstrip("/"), keep, metric, mode
        self.filesystem, self.path = storage.filesystem_of(self.location)

    def _index(self) -> list[dict[str, Any]]:
        text = storage.read_text(self.location, INDEX_FILE)
        return [] if text is None else json.loads(text)["checkpoints"]

    def latest(self) -> Any:
        """The last saved checkpoint (a `ray.train.Checkpoint`), or None."""
        import ray.train

        entries = self._index()
        if not entries:
            return None
        return ray.train.Checkpoint(f"{self.path}/{entries[-1]['name']}", filesystem=self.filesystem)

    def save(self, folder: Path, metrics: dict[str, Any]) -> str:
        """Persist a copy of `folder`; returns its path in the store's filesystem."""
        name = f"checkpoint_{time.strftime('%Y-%m-%d_%H-%M-%S')}.{time.time_ns() % 10**9:09d}"
        with tempfile.TemporaryDirectory(prefix="tl-ray-publish-") as staging:
            copy = Path(staging) / name
            shutil.copytree(folder, copy)
            storage.publish_folder(copy, f"{self.location}/{name}", marker=MARKER)
        entries = [*self._index(), {"name": name, "score": metrics.get(self.metric)}]
        kept = self._retained(entries)
        storage.write_text(self.location, INDEX_FILE, json.dumps({"checkpoints": kept}, indent=1))
        for entry in entries:
            if entry not in kept:
                self.filesystem.delete_dir(f"{self.path}/{entry['name']}")
        return f"{self.path}/{name}"

    def _retained(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The best `keep` by score (a missing score ranks last), plus the latest, in order."""
        sign = 1 if self.mode == "max" else -1
        ranked = sorted(entries, key=lambda e: float("-inf") if e["score"] is None else sign * e["score"])
        best = ranked[-self.keep :]
        return [e for e in entries if e in best or e is entries[-1]]


class TrialSession:
    """One worker run in a Ray Tune trial's own process (see the module docstring)."""

    rank, world, distributed = 0, 1, False

    def __init__(self, tables: dict[str, pa.Table], store: CheckpointStore, *, cpus: float) -> None:
        import ray
        import torch

        self.tables, self.store = tables, store
        self.device = trial_device(ray.get_gpu_ids())
        torch.set_num_threads(max(1, int(cpus)))  # what the trial reserved, as Ray Train sizes workers

    def shard(self, name: str) -> TableShard:
        return TableShard(self.tables[name])

    def checkpoint(self) -> Any:
        return self.store.latest()

    def prepare_model(self, model: Any) -> Any:
        return model.to(self.device)

    def report(self, metrics: dict[str, Any], folder: Path | None = None) -> None:
        from ray import tune

        extra = {} if folder is None else {"checkpoint_path": self.store.save(folder, metrics)}
        tune.report({**metrics, **extra})
