"""storage_path: local paths, URIs through pyarrow, and the single-node fast path."""

from __future__ import annotations

import shutil

import pytest

from tl_ray.config import parse_config
from tl_ray.errors import ConfigError
from tl_ray.storage import check_reachable, fetch_checkpoint, resolve_storage, storage_location


def test_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_storage("ckpt") == str(tmp_path / "ckpt")
    assert storage_location(None, "out") == str(tmp_path / "out")
    assert storage_location("file:///srv/ckpt", "out") == "file:///srv/ckpt"


def test_unsupported_scheme_is_a_config_error():
    with pytest.raises(ConfigError, match="unsupported scheme 'ftp'.*s3://"):
        resolve_storage("ftp://host/ckpt")


def test_config_accepts_storage_path():
    cfg = parse_config({"data": {"path": "x.csv"}, "storage_path": "s3://bucket/tl-ray"})
    assert cfg.storage_path == "s3://bucket/tl-ray"
    assert parse_config({"data": {"path": "x.csv"}}).storage_path is None


def test_fetch_checkpoint_copies_from_a_uri(tmp_path):
    source = tmp_path / "remote" / "checkpoint_1"
    (source / "sub").mkdir(parents=True)
    (source / "manifest.json").write_text("{}")
    (source / "sub" / "w.bin").write_bytes(b"\x00" * 10)
    local = fetch_checkpoint(str(source), f"file://{tmp_path / 'remote'}")
    assert local != source and (local / "manifest.json").read_text() == "{}"
    assert (local / "sub" / "w.bin").stat().st_size == 10
    assert fetch_checkpoint(str(source), str(tmp_path)) == source  # a local location: no copy


def test_single_node_needs_no_probe(ray_session, tmp_path):
    check_reachable(str(tmp_path / "ckpt"), marker_name="never-written")  # no other node: no check
    assert not (tmp_path / "ckpt").exists()  # nothing written, nothing probed


def test_training_with_a_uri_storage_path(ray_session, tiny_bert, sentiment_csv, tmp_path):
    """A `file://` storage_path goes through pyarrow end to end: checkpoints and the published
    frozen-prefix cache land under the URI (never in `output`), the best checkpoint is copied
    back into OUTPUT/model, and the worker trains from its node's own copy of the cache."""
    import ray

    from tl_ray.data import load_datasets
    from tl_ray.train.driver import train
    from tl_ray.train.feature_cache import local_cache_root, plan_cache

    output, storage = tmp_path / "out", tmp_path / "bucket"
    cfg = parse_config({
        "data": {"path": str(sentiment_csv), "validation_split": 0.25},
        "backbone": {"name_or_path": tiny_bert, "pooling": "cls", "unfreeze_depth": 1},
        "train": {"max_length": 16, "epochs": 2, "batch_size": 16, "keep_checkpoints": 1},
        "output": str(output),
        "storage_path": f"file://{storage}",
    })  # fmt: skip
    plan = plan_cache(cfg, load_datasets(cfg.data, seed=cfg.train.seed), f"file://{storage}/cache")
    node_copy = ray.get(ray.remote(local_cache_root).remote()) / plan.name  # the workers' node root
    shutil.rmtree(node_copy, ignore_errors=True)  # left by an earlier session: fetch it afresh

    outcome = train(cfg)
    assert outcome.checkpoint_dir.startswith(str(storage))
    assert len(list(storage.glob("train_*/checkpoint_*/manifest.json"))) == 1  # keep_checkpoints
    assert (output / "model" / "manifest.json").is_file() and outcome.metrics["epoch"] in (1, 2)
    assert sorted(p.name for p in output.iterdir() if p.name != "ray.log") == ["model", "tensorboard"]  # no checkpoints, no cache there
    published = storage / "cache" / plan.name
    assert (published / "meta.json").is_file()
    files = {p.name: p.read_bytes() for p in published.iterdir()}
    assert {p.name: p.read_bytes() for p in node_copy.iterdir()} == files
