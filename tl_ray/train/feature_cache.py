"""Compute what a frozen backbone bottom outputs once per example, and reuse it every epoch.

When the bottom of a backbone is frozen and deterministic (its dropout off), its output for
an example never changes during training. `ensure_cache` computes it once (a Ray task with one
training worker's resources) into a folder of raw, memory-mapped arrays; every worker of every
trial that shares the same key reads it instead of running the frozen layers again.

The key covers the backbone family and boundary, digests of the weight and tokenizer files,
`max_length`, and the exact texts of both splits, so a stale cache is never read. Layout:

    CACHE_ROOT/<key[:20]>/meta.json                  splits, tensors, shapes, bytes
    CACHE_ROOT/<key[:20]>/<split>.<tensor>.bin       rows back to back (float32 / int64)
    CACHE_ROOT/<key[:20]>/<split>.index.npy          per original row: (start, length)

Example:
    >>> plan = plan_cache(cfg, datasets, Path("runs/demo/cache"))  # doctest: +SKIP
    >>> folder = ensure_cache(plan, cfg, datasets)                 # doctest: +SKIP
    >>> FeatureCache(folder).batch("train", np.array([0, 5]))      # doctest: +SKIP
    {'hidden_states': tensor(...), 'attention_mask': tensor(...)}
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

    from tl_ray.config import RunConfig
    from tl_ray.data import Datasets

__all__ = ["CachePlan", "FeatureCache", "build_cache", "ensure_cache", "plan_cache"]

log = logging.getLogger("tl_ray.train")

FORMAT = 1
META_FILE = "meta.json"
MASK = "attention_mask"
SPLITS = ("train", "validation")
_CHUNK = 64  # texts per forward pass while building


@dataclass(frozen=True)
class CachePlan:
    """Where the cache of one (backbone, boundary, data) combination lives."""

    folder: Path
    key: str
    boundary: str


def _texts_digest(table: "pa.Table") -> str:
    digest = hashlib.sha256()
    for text in table.column("text").to_pylist():
        digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


def plan_cache(cfg: "RunConfig", datasets: "Datasets", root: Path) -> CachePlan | None:
    """The cache this run can use, or None (turned off, or not exact for this backbone)."""
    from tl_ray.backbones.registry import get_backbone

    if not cfg.train.cache:
        return None
    backbone = get_backbone(cfg.backbone)
    boundary = backbone.prefix_cache()
    if boundary is None:
        log.info("frozen-prefix cache not used: nothing frozen below the trainable part is cacheable")
        return None
    identity = {
        "format": FORMAT,
        "kind": cfg.backbone.kind,
        "boundary": boundary,
        "max_length": cfg.train.max_length,
        **backbone.fingerprint(),
        **{f"data_{name}": _texts_digest(getattr(datasets, name)) for name in SPLITS},
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return CachePlan(Path(root) / key[:20], key, boundary)


def ensure_cache(plan: CachePlan, cfg: "RunConfig", datasets: "Datasets") -> Path | None:
    """The ready cache folder: reused if present, else built by a Ray task; None if too big."""
    import ray

    if (plan.folder / META_FILE).is_file():
        log.info("frozen-prefix cache: reusing %s", plan.folder)
        return plan.folder
    tcfg = cfg.train
    task = ray.remote(build_cache).options(
        num_cpus=tcfg.cpus_per_worker,
        num_gpus=1 if tcfg.use_gpu else 0,
        scheduling_strategy="DEFAULT",  # not inside a Tune trial's placement group
    )
    tables = {name: getattr(datasets, name).select(["text"]) for name in SPLITS}
    started = time.perf_counter()
    folder = ray.get(task.remote(plan, cfg.model_dump(), tables, len(datasets.labels)))
    if folder is not None:
        meta = json.loads((Path(folder) / META_FILE).read_text(encoding="utf-8"))
        log.info(
            "frozen-prefix cache: %s (%.1f MB, %.1f s)",
            folder, meta["bytes"] / 2**20, time.perf_counter() - started,
        )
    return None if folder is None else Path(folder)


def build_cache(
    plan: CachePlan, run: dict[str, Any], tables: dict[str, "pa.Table"], num_labels: int
) -> str | None:
    """Compute and write the cache (exclusive per key: concurrent trials wait, then reuse)."""
    plan.folder.parent.mkdir(parents=True, exist_ok=True)
    with open(plan.folder.with_name(plan.folder.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (plan.folder / META_FILE).is_file():
            return str(plan.folder)
        tmp = plan.folder.with_name(f".{plan.folder.name}.{uuid.uuid4().hex}.tmp")
        tmp.mkdir()
        try:
            if not _write(tmp, plan, run, tables, num_labels):
                return None
            os.replace(tmp, plan.folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(plan.folder)


def _write(folder: Path, plan: CachePlan, run: dict, tables: dict, num_labels: int) -> bool:
    import torch

    from tl_ray.backbones.registry import get_backbone
    from tl_ray.config import parse_config

    cfg = parse_config(run)
    backbone = get_backbone(cfg.backbone)
    model = backbone.build(num_labels)
    backbone.apply_unfreeze(model)
    model.eval()
    device = torch.device("cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu")
    model.to(device)
    budget = cfg.train.cache_max_mb * 2**20
    rows_total = sum(table.num_rows for table in tables.values())
    meta: dict[str, Any] = {"format": FORMAT, "key": plan.key, "boundary": plan.boundary, "splits": {}}
    written = seen = 0  # bytes and rows of the splits already done
    for split, table in tables.items():
        texts = table.column("text").to_pylist()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # less padding
        index = np.zeros((len(texts), 2), dtype=np.int64)
        files: dict[str, Any] = {}
        shapes: dict[str, dict[str, Any]] = {}
        for start in range(0, len(order), _CHUNK):
            rows = order[start : start + _CHUNK]
            inputs = backbone.preprocess([texts[i] for i in rows], cfg.train.max_length)
            features = backbone.frozen_features(model, {k: v.to(device) for k, v in inputs.items()})
            lengths = _lengths(features)
            for name, tensor in features.items():
                if name == MASK:
                    continue
                array = tensor.float().cpu().numpy() if tensor.is_floating_point() else tensor.cpu().numpy()
                if name not in files:
                    files[name] = open(folder / f"{split}.{name}.bin", "wb")
                    tail = list(array.shape[2:] if lengths is not None else array.shape[1:])
                    shapes[name] = {"dtype": array.dtype.str, "tail": tail, "sequence": lengths is not None}
                for j, row in enumerate(rows):
                    piece = array[j, : lengths[j]] if lengths is not None else array[j]
                    files[name].write(np.ascontiguousarray(piece).tobytes())
            for j, row in enumerate(rows):  # starts are filled in once all lengths are known
                index[row, 1] = int(lengths[j]) if lengths is not None else 1
            done = written + sum(handle.tell() for handle in files.values())
            projected = done / (seen + start + len(rows)) * rows_total
            if projected > budget:
                for handle in files.values():
                    handle.close()
                log.warning(
                    "frozen-prefix cache not used: it would take about %.0f MB, over "
                    "train.cache_max_mb=%g; training runs the frozen layers every epoch",
                    projected / 2**20, cfg.train.cache_max_mb,
                )
                return False
        written += sum(handle.tell() for handle in files.values())
        seen += len(texts)
        for handle in files.values():
            handle.close()
        lengths_in_order = index[order, 1]
        starts = np.zeros(len(order), dtype=np.int64)
        starts[1:] = np.cumsum(lengths_in_order)[:-1]
        index[order, 0] = starts
        np.save(folder / f"{split}.index.npy", index)
        meta["splits"][split] = {"rows": len(texts), "tensors": shapes}
    meta["bytes"] = sum(p.stat().st_size for p in folder.iterdir())
    (folder / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return True


def _lengths(features: dict[str, "torch.Tensor"]) -> list[int] | None:
    mask = features.get(MASK)
    return None if mask is None else mask.sum(dim=1).tolist()


class FeatureCache:
    """Read side: memory-maps a built cache and assembles padded batches by row number."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / META_FILE).read_text(encoding="utf-8"))
        self._maps: dict[tuple[str, str], np.ndarray] = {}

    def _values(self, split: str, name: str) -> np.ndarray:
        if (split, name) not in self._maps:
            spec = self.meta["splits"][split]["tensors"][name]
            values = np.memmap(self.folder / f"{split}.{name}.bin", dtype=np.dtype(spec["dtype"]), mode="r")
            self._maps[split, name] = values.reshape(-1, *spec["tail"])
        return self._maps[split, name]

    def _index(self, split: str) -> np.ndarray:
        if (split, "index") not in self._maps:
            self._maps[split, "index"] = np.load(self.folder / f"{split}.index.npy", mmap_mode="r")
        return self._maps[split, "index"]

    def batch(self, split: str, rows: np.ndarray) -> dict[str, "torch.Tensor"]:
        """The cached features of `rows` (original row numbers), padded like a fresh batch."""
        import torch

        index = np.asarray(self._index(split)[np.asarray(rows, dtype=np.int64)])
        starts, lengths = index[:, 0], index[:, 1]
        out: dict[str, torch.Tensor] = {}
        sequence = False
        for name, spec in self.meta["splits"][split]["tensors"].items():
            values = self._values(split, name)
            if not spec["sequence"]:
                out[name] = torch.from_numpy(np.stack([values[s] for s in starts]))
                continue
            sequence = True
            width = int(lengths.max())
            padded = np.zeros((len(rows), width, *spec["tail"]), dtype=values.dtype)
            for j, (start, length) in enumerate(zip(starts, lengths)):
                padded[j, :length] = values[start : start + length]
            out[name] = torch.from_numpy(padded)
        if sequence:
            width = int(lengths.max())
            out[MASK] = torch.from_numpy((np.arange(width)[None, :] < lengths[:, None]).astype(np.int64))
        return out
