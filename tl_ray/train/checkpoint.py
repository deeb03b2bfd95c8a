"""The self-describing checkpoint folder: the one thing that crosses every boundary.

Layout: backbone weights and preprocessing assets (written by the backbone), `labels.json`,
`manifest.json` (backbone config, metrics, epoch, package versions) and, in training
checkpoints only, `train_state.pt` (optimizer, scheduler, epoch) for resuming.

Example:
    >>> backbone, model, labels, manifest = load_model_folder("runs/demo/model")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tl_ray.data import LabelMap
from tl_ray.errors import CheckpointError
from tl_ray.io import atomic_folder, write_json_atomic

if TYPE_CHECKING:
    from torch import nn

    from tl_ray.backbones.base import Backbone

__all__ = [
    "FORMAT_VERSION",
    "LABELS_FILE",
    "MANIFEST_FILE",
    "TRAIN_STATE_FILE",
    "export_model_folder",
    "load_model_folder",
    "read_manifest",
    "write_model_folder",
]

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
LABELS_FILE = "labels.json"
TRAIN_STATE_FILE = "train_state.pt"
# TensorFlow is `tensorflow` (extras keras and keras-gpu), or tensorflow-cpu where installed by hand.
_VERSIONED = ("tl-ray", "torch", "transformers", "peft", "ray", "gensim",
              "tensorflow", "tensorflow-cpu", "tf-keras")


def _versions() -> dict[str, str]:
    found = {}
    for package in _VERSIONED:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def write_model_folder(
    folder: Path,
    backbone: "Backbone",
    model: "nn.Module",
    labels: LabelMap,
    *,
    metrics: dict[str, Any],
    epoch: int,
    extra: dict[str, Any] | None = None,
) -> None:
    """Save everything serving needs into `folder` (which must exist)."""
    folder = Path(folder)
    backbone.save(model, folder)
    labels.save(folder / LABELS_FILE)
    manifest = {
        "format_version": FORMAT_VERSION,
        "backbone": backbone.cfg.model_dump(),
        "base_path": getattr(backbone, "path", None),
        "num_labels": len(labels),
        "epoch": epoch,
        "metrics": metrics,
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
        "files": file_sizes(folder),
    }
    write_json_atomic(folder / MANIFEST_FILE, manifest)


def file_sizes(folder: str | Path) -> dict[str, int]:
    """{relative path: bytes} of every file in `folder` but the manifest and labels.json: what a
    manifest's `files` lists, so a reader can tell a whole folder from one whose copy was cut
    short (Ray uploads a checkpoint's files in no set order: the manifest may land before
    them). labels.json may be edited by hand; a cut-short one fails to parse on its own."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in (MANIFEST_FILE, LABELS_FILE)}  # fmt: skip


def _check_files(folder: Path, files: Any) -> None:
    if not isinstance(files, dict):
        raise CheckpointError(f"{folder / MANIFEST_FILE}: `files` is not a mapping of file sizes")
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{folder} is incomplete: it has no {name} (a copy cut short?)")
        if path.stat().st_size != size:
            raise CheckpointError(f"{folder} is incomplete: {name} has {path.stat().st_size} bytes, "
                                  f"its manifest says {size} (a copy cut short?)")


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a checkpoint folder, with a clear error when it is not one."""
    path = Path(folder) / MANIFEST_FILE
    if not Path(folder).is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a tl-ray checkpoint: it has no {MANIFEST_FILE}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {manifest.get('format_version')!r}; "
            f"this tl-ray reads version {FORMAT_VERSION}"
        )
    if "files" in manifest:  # folders written before tl-ray listed them have no `files`
        _check_files(Path(folder), manifest["files"])
    return manifest


def load_model_folder(
    folder: str | Path, *, trainable: bool = False
) -> tuple["Backbone", "nn.Module", LabelMap, dict[str, Any]]:
    """Rebuild (backbone, model, labels, manifest) from a checkpoint folder alone."""
    from tl_ray.backbones.registry import get_backbone
    from tl_ray.config import parse_backbone

    folder = Path(folder)
    manifest = read_manifest(folder)
    backbone_cfg = dict(manifest["backbone"])
    if backbone_cfg.get("mode", "finetune") != "lora" and "name_or_path" in backbone_cfg:
        backbone_cfg["name_or_path"] = str(folder)  # full weights and tokenizer live here
    backbone = get_backbone(parse_backbone(backbone_cfg))
    labels = LabelMap.load(folder / LABELS_FILE)
    model = backbone.load(folder, num_labels=len(labels), trainable=trainable)
    return backbone, model, labels, manifest


def export_model_folder(source: str | Path, destination: str | Path) -> Path:
    """Copy a training checkpoint to `destination` without its resume state, atomically
    (an existing `destination` is swapped out, then deleted)."""
    source, destination = Path(source), Path(destination)
    read_manifest(source)
    with atomic_folder(destination) as tmp:
        shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(TRAIN_STATE_FILE))
    return destination
