"""Compute what a frozen backbone bottom outputs once per example, and reuse it every epoch.

When the bottom of a backbone is frozen and deterministic (its dropout off), its output for
an example never changes during training. `ensure_cache` computes it once (a Ray task with one
training worker's resources) into a folder of raw, memory-mapped arrays; every worker of every
trial that shares the same key reads it instead of running the frozen layers again.

The key covers the backbone family and boundary, digests of the weight and tokenizer files,
`max_length`, and the exact texts of both splits, so a stale cache is never read. Layout:

    ROOT/<key[:20]>/meta.json                  splits, tensors, shapes, bytes (written last)
    ROOT/<key[:20]>/<split>.<tensor>.bin       rows back to back (float32 / int64)
    ROOT/<key[:20]>/<split>.index.npy          per original row: (start, length)

On a cluster ROOT is under the storage location (`storage_path`, a shared path or an
`s3://` / `gs://` / `file://` URI). The build task writes on its own node's disk and
publishes with `tl_ray.storage.publish_folder`: a reader trusts only a folder whose meta.json
exists, and two racing builders are harmless (the first to publish wins, the other discards
its copy). Workers call `FeatureCache.open(location, key)`: a URI is fetched once per node,
under a node-local lock, into `local_cache_root()/<key[:20]>` and memory-mapped there; a plain
path (one machine, or an NFS mount every node sees) is memory-mapped in place.

Example:
    >>> plan = plan_cache(cfg, datasets, "s3://bucket/runs/cache")  # doctest: +SKIP
    >>> location = ensure_cache(plan, cfg, datasets)               # doctest: +SKIP
    >>> FeatureCache.open(location, plan.key).batch("train", np.array([0, 5]))  # doctest: +SKIP
    {'hidden_states': tensor(...), 'attention_mask': tensor(...)}
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from tl_ray.errors import TLRayError
from tl_ray.io import atomic_folder
from tl_ray.storage import download_folder, is_uri, publish_folder, read_text

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

    from tl_ray.config import RunConfig
    from tl_ray.data import Datasets

__all__ = [
    "CACHE_DIR_ENV",
    "CachePlan",
    "FeatureCache",
    "build_cache",
    "ensure_cache",
    "local_cache_root",
    "local_copy",
    "plan_cache",
]

log = logging.getLogger("tl_ray.train")

FORMAT = 1
META_FILE = "meta.json"
MASK = "attention_mask"
SPLITS = ("train", "validation")
_CHUNK = 64  # texts per forward pass while building
CACHE_DIR_ENV = "TL_RAY_CACHE_DIR"  # a node's own disk for fetched caches and builds


@dataclass(frozen=True)
class CachePlan:
    """Where the cache of one (backbone, boundary, data) combination is published."""

    location: str  # ROOT/<key[:20]>: an absolute path or a URI
    key: str
    boundary: str

    @property
    def name(self) -> str:
        """The cache's folder name, here and on every node."""
        return self.key[:20]


def _texts_digest(table: "pa.Table") -> str:
    digest = hashlib.sha256()
    for text in table.column("text").to_pylist():
        digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


def plan_cache(cfg: "RunConfig", datasets: "Datasets", root: str | Path) -> CachePlan | None:
    """The cache this run can use under `root` (a path or a URI), or None (off, or not exact)."""
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
    root = str(root) if is_uri(str(root)) else str(Path(root).expanduser().resolve())
    return CachePlan(f"{root.rstrip('/')}/{key[:20]}", key, boundary)


def _meta(location: str | Path, key: str) -> dict[str, Any] | None:
    """The meta.json of a complete cache of `key` at `location`, else None."""
    text = read_text(str(location), META_FILE)
    meta = None if text is None else json.loads(text)
    return meta if meta is not None and meta.get("key") == key else None


def ensure_cache(plan: CachePlan, cfg: "RunConfig", datasets: "Datasets", *, inline: bool = False) -> str | None:
    """The published cache's location: reused if there, else built; None if too big.

    It is built by a Ray task with a worker's resources, or `inline` in this process when
    this process already holds them (a one-worker trial run in its own process: a task
    would wait for CPUs that the running trials hold).
    """
    import ray

    if _meta(plan.location, plan.key) is not None:
        log.info("frozen-prefix cache: reusing %s", plan.location)
        return plan.location
    tcfg = cfg.train
    tables = {name: getattr(datasets, name).select(["text"]) for name in SPLITS}
    started = time.perf_counter()
    if inline:
        location = build_cache(plan, cfg.model_dump(), tables, len(datasets.labels))
    else:
        task = ray.remote(build_cache).options(
            num_cpus=tcfg.cpus_per_worker,
            num_gpus=1 if tcfg.use_gpu else 0,
            scheduling_strategy="DEFAULT",  # not inside a Tune trial's placement group
        )
        location = ray.get(task.remote(plan, cfg.model_dump(), tables, len(datasets.labels)))
    if location is not None:
        meta = _meta(location, plan.key) or {"bytes": 0}
        log.info(
            "frozen-prefix cache: %s (%.1f MB, %.1f s)",
            location, meta["bytes"] / 2**20, time.perf_counter() - started,
        )
    return location


def build_cache(
    plan: CachePlan, run: dict[str, Any], tables: dict[str, "pa.Table"], num_labels: int
) -> str | None:
    """Compute the cache on this node's disk and publish it at `plan.location`; None if too big.

    Builders on one node take turns (a node-local lock); a builder on another node that
    publishes first wins, and this one's copy is discarded.
    """
    root = local_cache_root()
    with _node_lock(root / f".{plan.name}.build.lock"):
        if _meta(plan.location, plan.key) is not None:
            return plan.location
        # beside a plain-path target (publishing is then one rename), else on this node's disk
        near = root if is_uri(plan.location) else Path(plan.location).parent
        near.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{plan.name}.", suffix=".tmp", dir=near))
        try:
            if not _write(scratch, plan, run, tables, num_labels):
                return None
            if not publish_folder(scratch, plan.location, marker=META_FILE):
                log.info("frozen-prefix cache: %s was published by another builder", plan.location)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return plan.location


def local_cache_root() -> Path:
    """This node's folder for fetched caches: $TL_RAY_CACHE_DIR, else TMPDIR/tl-ray-cache."""
    root = Path(os.environ.get(CACHE_DIR_ENV) or Path(tempfile.gettempdir()) / "tl-ray-cache")
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextmanager
def _node_lock(path: Path) -> Iterator[None]:
    """An exclusive lock among the processes of this node (flock on node-local disk)."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def local_copy(location: str, key: str) -> Path:
    """A folder on this node holding the published cache `key` at `location`.

    A URI is downloaded once per node into `local_cache_root()/<key[:20]>` (concurrent
    workers wait for the first); a plain path is shared by every node and used in place.

    >>> local_copy("s3://bucket/runs/cache/0123456789abcdef0123", key)  # doctest: +SKIP
    PosixPath('/tmp/tl-ray-cache/0123456789abcdef0123')
    """
    if not is_uri(location):
        if _meta(location, key) is None:
            raise TLRayError(f"frozen-prefix cache {location} is missing or incomplete (no {META_FILE})")
        return Path(location)
    target = local_cache_root() / key[:20]
    if _meta(target, key) is not None:
        return target
    with _node_lock(target.with_name(f".{target.name}.lock")):
        if _meta(target, key) is not None:
            return target
        if _meta(location, key) is None:
            raise TLRayError(f"frozen-prefix cache {location} is not published (no {META_FILE})")
        with atomic_folder(target) as scratch:  # replaces any incomplete copy of this key
            download_folder(location, scratch)
            if _meta(scratch, key) is None:
                raise TLRayError(f"frozen-prefix cache {location} changed while it was fetched; run again")
    log.info("frozen-prefix cache: fetched %s to %s", location, target)
    return target


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

    @classmethod
    def open(cls, location: str, key: str) -> FeatureCache:
        """The published cache `key` at `location`, read from this node's copy (`local_copy`)."""
        return cls(local_copy(location, key))

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
