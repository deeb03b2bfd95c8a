"""The in-process trial's checkpoint store: Train's layout and retention, whole or absent."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs
import pytest

from tl_ray import storage
from tl_ray.train.session import INDEX_FILE, CheckpointStore, trial_device


def _checkpoint(tmp_path: Path, epoch: int) -> Path:
    folder = tmp_path / f"made-{epoch}"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(bytes([epoch]) * 64)
    (folder / "manifest.json").write_text(json.dumps({"epoch": epoch}))
    return folder


def _epochs(store: CheckpointStore, root: Path) -> list[int]:
    index = json.loads((root / INDEX_FILE).read_text())["checkpoints"]
    return [json.loads((root / e["name"] / "manifest.json").read_text())["epoch"] for e in index]


@pytest.mark.parametrize("mode, scores, kept", [
    ("max", [0.5, 0.9, 0.6, 0.7], [2, 4]),   # the best (epoch 2) and the latest
    ("min", [0.5, 0.9, 0.6, 0.7], [1, 4]),
    ("max", [0.5, 0.6, 0.7, 0.8], [4]),      # the latest is the best: one folder
])
def test_keeps_the_best_n_and_the_latest_and_deletes_the_rest(tmp_path, mode, scores, kept):
    root = tmp_path / "trials" / "optuna_0"
    store = CheckpointStore(str(root), keep=1, metric="val_x", mode=mode)
    assert store.latest() is None
    for epoch, score in enumerate(scores, start=1):
        path = store.save(_checkpoint(tmp_path, epoch), {"val_x": score, "epoch": epoch})
        assert Path(path).parent == root and (Path(path) / "manifest.json").is_file()
    assert _epochs(store, root) == kept
    assert len([p for p in root.iterdir() if p.is_dir()]) == len(kept)  # dropped folders deleted
    with store.latest().as_directory() as latest:
        assert json.loads((Path(latest) / "manifest.json").read_text())["epoch"] == len(scores)
    assert not list(root.glob(".*tmp"))  # no staging left behind


def test_a_missing_score_never_pushes_out_a_scored_checkpoint(tmp_path):
    root = tmp_path / "run"
    store = CheckpointStore(str(root), keep=1, metric="val_loss", mode="min")
    store.save(_checkpoint(tmp_path, 1), {"val_loss": 0.3})
    store.save(_checkpoint(tmp_path, 2), {})
    store.save(_checkpoint(tmp_path, 3), {"val_loss": 0.9})
    assert _epochs(store, root) == [1, 3]


def test_an_object_store_gets_the_same_layout(tmp_path, monkeypatch):
    """s3://-style storage (no rename): folders uploaded with their manifest last, then the index."""
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    real = storage.filesystem_of

    def filesystem(location: str):
        if location.startswith("s3://bucket/"):
            return pyarrow.fs.SubTreeFileSystem(str(bucket), pyarrow.fs.LocalFileSystem()), location[12:]
        return real(location)

    monkeypatch.setattr(storage, "filesystem_of", filesystem)
    store = CheckpointStore("s3://bucket/trials/optuna_3", keep=1, metric="val_accuracy", mode="max")
    for epoch, score in ((1, 0.8), (2, 0.6)):
        path = store.save(_checkpoint(tmp_path, epoch), {"val_accuracy": score})
        assert path.startswith("trials/optuna_3/checkpoint_")
    assert _epochs(store, bucket / "trials" / "optuna_3") == [1, 2]
    with store.latest().as_directory() as latest:
        assert json.loads((Path(latest) / "manifest.json").read_text())["epoch"] == 2


def test_a_trial_computes_on_the_gpu_ray_gave_it():
    assert trial_device([]).type == "cpu"
    assert str(trial_device([5])) == "cuda:0"  # CUDA_VISIBLE_DEVICES holds just that GPU
