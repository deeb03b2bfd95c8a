"""The frozen-prefix cache: exact features, keys, the size bound, publishing to shared storage
and fetching once per node, and the same loss trajectory with and without it in real Ray Train
runs."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs
import pytest
import torch

from tl_ray.backbones.registry import get_backbone
from tl_ray.config import parse_config
from tl_ray.data import load_datasets
from tl_ray import storage
from tl_ray.errors import TLRayError
from tl_ray.storage import publish_folder, read_text
from tl_ray.train import feature_cache
from tl_ray.train.checkpoint import read_manifest
from tl_ray.train.feature_cache import CACHE_DIR_ENV, FeatureCache, build_cache, local_copy, plan_cache

TEXTS = ["a good film", "a bad, bad film with a long and dull middle", "so so", "brilliant"]


def _cfg(tiny_bert, csv, tmp_path, **backbone):
    return parse_config(
        {
            "data": {"path": str(csv), "validation_split": 0.25},
            "backbone": {"name_or_path": tiny_bert, "pooling": "cls", **backbone},
            "train": {"max_length": 16, "epochs": 3, "batch_size": 16, "lr": 5e-3, "seed": 3},
            "output": str(tmp_path),
        }
    )


def _tables(texts):
    table = pa.table({"text": texts})
    return {"train": table, "validation": table.slice(0, 2)}


@pytest.fixture(autouse=True)
def node_root(tmp_path, monkeypatch) -> Path:
    """This process's node-local cache root (each simulated node gets its own)."""
    root = tmp_path / "node-a"
    monkeypatch.setenv(CACHE_DIR_ENV, str(root))
    return root


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _leftovers(*folders: Path) -> list[Path]:
    return [p for folder in folders if folder.exists() for p in folder.glob(".*.tmp")]


@pytest.mark.parametrize("depth", [0, 1])
def test_cached_features_give_the_logits_of_the_raw_inputs(tiny_bert, sentiment_csv, tmp_path, depth):
    cfg = _cfg(tiny_bert, sentiment_csv, tmp_path, unfreeze_depth=depth)
    datasets = load_datasets(cfg.data, seed=0)
    plan = plan_cache(cfg, datasets, tmp_path / "cache")
    assert plan.boundary == ("pooled" if depth == 0 else "layer1")
    location = build_cache(plan, cfg.model_dump(), _tables(TEXTS), num_labels=2)
    assert location == plan.location == str(tmp_path / "cache" / plan.name)
    assert (Path(location) / "meta.json").is_file()
    assert not _leftovers(tmp_path / "cache")  # written aside, then renamed

    backbone = get_backbone(cfg.backbone)
    torch.manual_seed(0)
    model = backbone.build(2)  # same pretrained encoder; any head
    backbone.apply_unfreeze(model)
    model.eval()
    cache = FeatureCache.open(location, plan.key)
    assert cache.folder == Path(location)  # a plain path: every node sees it, read in place
    rows = np.array([3, 1, 0])  # any subset, any order, padded like a fresh batch
    with torch.no_grad():
        raw = model(**backbone.preprocess([TEXTS[i] for i in rows], 16))
        cached = model(**cache.batch("train", rows))
    torch.testing.assert_close(cached, raw, atol=1e-5, rtol=1e-4)


def test_dropout_stays_off_in_the_frozen_bottom(tiny_bert, sentiment_csv, tmp_path):
    cfg = _cfg(tiny_bert, sentiment_csv, tmp_path, unfreeze_depth=1)
    backbone = get_backbone(cfg.backbone)
    model = backbone.build(2)
    backbone.apply_unfreeze(model)
    model.train()
    inputs = backbone.preprocess(TEXTS, 16)
    first, second = (backbone.frozen_features(model, inputs)["hidden_states"] for _ in range(2))
    assert torch.equal(first, second)
    layer0, layer1 = model.encoder.encoder.layer
    assert not layer0.training and not model.encoder.embeddings.training and layer1.training


def test_key_changes_with_what_the_features_depend_on(tiny_bert, sentiment_csv, tmp_path):
    base = _cfg(tiny_bert, sentiment_csv, tmp_path, unfreeze_depth=1)
    datasets = load_datasets(base.data, seed=0)
    key = plan_cache(base, datasets, tmp_path).key
    same = base.model_copy(update={"train": base.train.model_copy(update={"lr": 0.1})})
    assert plan_cache(same, datasets, tmp_path).key == key  # trials differing in lr share it
    longer = base.model_copy(update={"train": base.train.model_copy(update={"max_length": 32})})
    assert plan_cache(longer, datasets, tmp_path).key != key
    other_data = load_datasets(base.data, seed=1)  # another split: other texts per split
    assert plan_cache(base, other_data, tmp_path).key != key
    depth0 = _cfg(tiny_bert, sentiment_csv, tmp_path, unfreeze_depth=0)
    assert plan_cache(depth0, datasets, tmp_path).key != key


@pytest.mark.parametrize(
    "backbone, train",
    [({"unfreeze_depth": 2}, {}), ({"unfreeze_depth": 1, "mode": "lora"}, {}), ({"unfreeze_depth": 1}, {"cache": False})],
    ids=["full-depth", "lora", "turned-off"],
)
def test_no_cache_where_it_would_not_be_exact_or_is_off(tiny_bert, sentiment_csv, tmp_path, backbone, train):
    cfg = _cfg(tiny_bert, sentiment_csv, tmp_path, **backbone)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update=train)})
    assert plan_cache(cfg, load_datasets(cfg.data, seed=0), tmp_path) is None


def test_a_cache_over_its_budget_is_not_written(tiny_bert, sentiment_csv, tmp_path, caplog, node_root):
    cfg = _cfg(tiny_bert, sentiment_csv, tmp_path, unfreeze_depth=1)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"cache_max_mb": 0.001})})
    datasets = load_datasets(cfg.data, seed=0)
    for root in (tmp_path / "cache", f"file://{tmp_path}/storage/cache"):
        plan = plan_cache(cfg, datasets, root)
        with caplog.at_level(logging.WARNING, logger="tl_ray.train"):
            assert build_cache(plan, cfg.model_dump(), _tables(TEXTS * 20), num_labels=2) is None
        assert "over train.cache_max_mb=0.001" in caplog.text
        assert read_text(plan.location, "meta.json") is None
    assert not list((tmp_path / "cache").iterdir()) and not (tmp_path / "storage" / "cache").exists()
    assert not _leftovers(node_root)


def _built(tiny_bert, sentiment_csv, tmp_path, root: str | Path):
    """A real depth-1 cache of TEXTS, published under `root`: (plan, location)."""
    cfg = _cfg(tiny_bert, sentiment_csv, tmp_path, unfreeze_depth=1)
    plan = plan_cache(cfg, load_datasets(cfg.data, seed=0), root)
    return plan, build_cache(plan, cfg.model_dump(), _tables(TEXTS), num_labels=2)


def test_a_uri_cache_is_fetched_once_to_each_nodes_disk(tiny_bert, sentiment_csv, tmp_path, node_root, monkeypatch):
    """Published under a `file://` storage URI (the pyarrow path every URI takes); each node
    copies it once into its own root and memory-maps that copy."""
    plan, location = _built(tiny_bert, sentiment_csv, tmp_path, f"file://{tmp_path}/storage/cache")
    published = tmp_path / "storage" / "cache" / plan.name
    assert location == plan.location == f"file://{published}" and (published / "meta.json").is_file()
    assert not (node_root / plan.name).exists() and not _leftovers(node_root, published.parent)

    copies = {}
    for node in ("node-a", "node-b"):  # two nodes: two roots, two copies
        monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / node))
        cache = FeatureCache.open(location, plan.key)
        assert cache.folder == tmp_path / node / plan.name
        assert _files(cache.folder) == _files(published)  # byte for byte
        copies[node] = cache
    rows = np.array([3, 0, 2])
    for name, tensor in FeatureCache(published).batch("train", rows).items():
        torch.testing.assert_close(copies["node-b"].batch("train", rows)[name], tensor, rtol=0, atol=0)

    def no_download(*args):
        raise AssertionError("fetched twice")

    monkeypatch.setattr(feature_cache, "download_folder", no_download)
    assert local_copy(location, plan.key) == tmp_path / "node-b" / plan.name  # reused
    with pytest.raises(TLRayError, match="not published"):  # another key is never served from it
        local_copy(location, "f" * 64)


def test_concurrent_workers_on_one_node_fetch_once(tiny_bert, sentiment_csv, tmp_path, node_root, monkeypatch):
    plan, location = _built(tiny_bert, sentiment_csv, tmp_path, f"file://{tmp_path}/storage/cache")
    fetched, real = [], feature_cache.download_folder
    monkeypatch.setattr(feature_cache, "download_folder", lambda *a: (fetched.append(a), real(*a)))
    results: list[Path] = []
    workers = [threading.Thread(target=lambda: results.append(local_copy(location, plan.key))) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert results == [node_root / plan.name] * 4 and len(fetched) == 1
    assert not _leftovers(node_root)


def test_a_half_published_cache_is_never_used(tiny_bert, sentiment_csv, tmp_path, node_root):
    """Data files without meta.json are refused by readers, and a builder does not take them
    for a cache (on a local or NFS path publishing is a rename, so only an outside hand leaves
    such a folder; object stores: `test_an_object_store_gets_meta_json_last`)."""
    plan, location = _built(tiny_bert, sentiment_csv, tmp_path, f"file://{tmp_path}/storage/cache")
    published = tmp_path / "storage" / "cache" / plan.name
    (published / "meta.json").unlink()
    with pytest.raises(TLRayError, match=f"frozen-prefix cache {location} is not published"):
        FeatureCache.open(location, plan.key)
    with pytest.raises(TLRayError, match="missing or incomplete"):
        local_copy(str(published), plan.key)  # a plain path too
    assert not (node_root / plan.name).exists()
    cfg = _cfg(tiny_bert, sentiment_csv, tmp_path, unfreeze_depth=1)
    with pytest.raises(TLRayError, match=f"{published} exists without meta.json .*delete it"):
        build_cache(plan, cfg.model_dump(), _tables(TEXTS), num_labels=2)
    assert not _leftovers(node_root, published.parent)


def _object_store(bucket: Path, monkeypatch) -> str:
    """`s3://bucket/...` served by a pyarrow filesystem that is not a LocalFileSystem, so
    publishing takes the object-store branch (no rename: data first, meta.json last)."""
    real = storage.filesystem_of

    def filesystem(location: str):
        if location.startswith("s3://bucket/"):
            return pyarrow.fs.SubTreeFileSystem(str(bucket), pyarrow.fs.LocalFileSystem()), location[12:]
        return real(location)

    monkeypatch.setattr(storage, "filesystem_of", filesystem)
    bucket.mkdir()
    return "s3://bucket/cache"


def test_an_object_store_gets_meta_json_last(tiny_bert, sentiment_csv, tmp_path, node_root, monkeypatch):
    root = _object_store(tmp_path / "bucket", monkeypatch)
    plan, location = _built(tiny_bert, sentiment_csv, tmp_path, root)
    published = tmp_path / "bucket" / "cache" / plan.name
    assert location == f"{root}/{plan.name}" and (published / "meta.json").is_file()
    assert _files(FeatureCache.open(location, plan.key).folder) == _files(published)

    source = tmp_path / "again"  # republish: the upload dies after its first object
    source.mkdir()
    for name, data in _files(published).items():
        (source / name).write_bytes(data)
    (published / "meta.json").unlink()
    copied, real = [], pyarrow.fs.copy_files

    def cut_off(src, dst, **kwargs):
        if copied:
            raise OSError("connection reset")
        copied.append(dst)
        real(src, dst, **kwargs)

    monkeypatch.setattr(pyarrow.fs, "copy_files", cut_off)
    with pytest.raises(OSError, match="connection reset"):
        publish_folder(source, location, marker="meta.json")
    assert not copied[0].endswith("meta.json") and read_text(location, "meta.json") is None
    monkeypatch.setattr(pyarrow.fs, "copy_files", real)
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "node-b"))
    with pytest.raises(TLRayError, match="not published"):
        local_copy(location, plan.key)
    assert publish_folder(source, location, marker="meta.json")  # the next publisher completes it
    assert _files(local_copy(location, plan.key)) == _files(source)


def test_racing_publishers_leave_one_whole_cache(tmp_path):
    """Two builders finish at once: the first rename wins, the second is told it lost and
    changes nothing; no staged folder is left behind."""
    built = {}
    for name in ("first", "second"):
        built[name] = tmp_path / name
        built[name].mkdir()
        (built[name] / "train.x.bin").write_bytes(name.encode() * 100)
        (built[name] / "meta.json").write_text(name)
    for location in (str(tmp_path / "cache" / "k"), f"file://{tmp_path}/uri-cache/k"):
        first, second = (tmp_path / f"{n}-{len(location)}" for n in ("first", "second"))
        for source, target in ((built["first"], first), (built["second"], second)):
            target.mkdir()
            for item in source.iterdir():
                (target / item.name).write_bytes(item.read_bytes())
        assert publish_folder(first, location, marker="meta.json") is True
        assert publish_folder(second, location, marker="meta.json") is False
        folder = Path(location.removeprefix("file://"))
        assert _files(folder) == _files(built["first"]) and not _leftovers(folder.parent)


def test_concurrent_builders_on_two_nodes_publish_one_cache(ray_session, tiny_bert, sentiment_csv, tmp_path):
    """Two build tasks, each with its own node-local root (no shared lock), race to publish."""
    import ray

    cfg = _cfg(tiny_bert, sentiment_csv, tmp_path, unfreeze_depth=1)
    plan = plan_cache(cfg, load_datasets(cfg.data, seed=0), f"file://{tmp_path}/storage/cache")
    roots = [tmp_path / "node-1", tmp_path / "node-2"]
    refs = [
        ray.remote(build_cache)
        .options(num_cpus=1, runtime_env={"env_vars": {CACHE_DIR_ENV: str(root)}})
        .remote(plan, cfg.model_dump(), _tables(TEXTS), 2)
        for root in roots
    ]
    assert ray.get(refs) == [plan.location] * 2
    published = tmp_path / "storage" / "cache"
    assert [p.name for p in published.iterdir()] == [plan.name] and not _leftovers(*roots)
    reference = tmp_path / "reference"
    assert build_cache(plan_cache(cfg, load_datasets(cfg.data, seed=0), reference), cfg.model_dump(),
                       _tables(TEXTS), 2)  # fmt: skip
    assert _files(published / plan.name) == _files(reference / plan.name)


def test_cached_and_uncached_training_follow_the_same_losses(ray_session, tiny_bert, sentiment_csv, tmp_path):
    from tl_ray.train.driver import train

    runs = {}
    for cache in (True, False):
        cfg = _cfg(tiny_bert, sentiment_csv, tmp_path / str(cache), unfreeze_depth=1)
        update = {"cache": cache, "keep_checkpoints": 3, "lr": 2e-2}
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update=update)})
        train(cfg)
        manifests = (tmp_path / str(cache)).glob("train_*/checkpoint_*/manifest.json")
        runs[cache] = sorted((read_manifest(p.parent)["metrics"] for p in manifests), key=lambda m: m["epoch"])
    assert [m["epoch"] for m in runs[True]] == [1, 2, 3]
    for cached, plain in zip(runs[True], runs[False]):
        for key in ("train_loss", "val_loss", "val_accuracy"):
            assert cached[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-5), (key, cached, plain)
    assert len(list((tmp_path / "True" / "cache").glob("*/meta.json"))) == 1
    assert not (tmp_path / "False" / "cache").exists()


@pytest.fixture
def word_vectors(tmp_path) -> Path:
    from gensim.models import KeyedVectors

    words = sorted({w for text in TEXTS for w in text.replace(",", " ").split()} - {"brilliant"})
    vectors = KeyedVectors(vector_size=8)
    vectors.add_vectors(words, np.random.default_rng(0).normal(size=(len(words), 8)).astype(np.float32))
    path = tmp_path / "tiny.vec"
    vectors.save_word2vec_format(str(path))
    return path


@pytest.mark.parametrize("encoder", ["cnn", "bilstm"])
def test_word_vectors_cache_the_frozen_embedded_sequences(word_vectors, sentiment_csv, tmp_path, encoder):
    raw = {
        "data": {"path": str(sentiment_csv)},
        "backbone": {"kind": "word-vectors", "vectors": str(word_vectors), "unfreeze_depth": 0,
                     "oov": "zero", "encoder": encoder, "cnn_maps": 4, "lstm_hidden": 4},
        "train": {"max_length": 16},
        "output": str(tmp_path),
    }  # fmt: skip
    cfg = parse_config(raw)
    datasets = load_datasets(cfg.data, seed=0)
    plan = plan_cache(cfg, datasets, tmp_path / "cache")
    assert plan.boundary == "embedded"
    location = build_cache(plan, cfg.model_dump(), _tables(TEXTS), num_labels=2)
    backbone = get_backbone(cfg.backbone)
    torch.manual_seed(0)
    model = backbone.build(2).eval()
    rows = np.array([2, 3, 1])  # "brilliant" is unknown: the zero vector, fixed
    with torch.no_grad():
        expected = model(**backbone.preprocess([TEXTS[i] for i in rows], 16))
        cached = model(**FeatureCache.open(location, plan.key).batch("train", rows))
    torch.testing.assert_close(cached, expected, atol=1e-5, rtol=1e-4)
    for change in ({"unfreeze_depth": 1}, {"oov": "learned"}):  # the embedding output trains
        other = parse_config({**raw, "backbone": {**raw["backbone"], **change}})
        assert plan_cache(other, datasets, tmp_path) is None
