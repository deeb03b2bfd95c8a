"""storage_path: local paths, URIs through pyarrow, and the single-node fast path."""

from __future__ import annotations

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
    check_reachable("s3://bucket/never-probed")
