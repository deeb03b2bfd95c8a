"""The frozen-prefix cache: exact features, keys, the size bound, and the same loss trajectory
with and without it in real Ray Train runs."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from tl_ray.backbones.registry import get_backbone
from tl_ray.config import parse_config
from tl_ray.data import load_datasets
from tl_ray.train.checkpoint import read_manifest
from tl_ray.train.feature_cache import FeatureCache, build_cache, plan_cache

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


@pytest.mark.parametrize("depth", [0, 1])
def test_cached_features_give_the_logits_of_the_raw_inputs(tiny_bert, sentiment_csv, tmp_path, depth):
    cfg = _cfg(tiny_bert, sentiment_csv, tmp_path, unfreeze_depth=depth)
    datasets = load_datasets(cfg.data, seed=0)
    plan = plan_cache(cfg, datasets, tmp_path / "cache")
    assert plan.boundary == ("pooled" if depth == 0 else "layer1")
    folder = build_cache(plan, cfg.model_dump(), _tables(TEXTS), num_labels=2)
    assert folder == str(plan.folder) and (plan.folder / "meta.json").is_file()
    assert not list(plan.folder.parent.glob(".*.tmp"))  # written aside, then renamed

    backbone = get_backbone(cfg.backbone)
    torch.manual_seed(0)
    model = backbone.build(2)  # same pretrained encoder; any head
    backbone.apply_unfreeze(model)
    model.eval()
    cache = FeatureCache(folder)
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


def test_a_cache_over_its_budget_is_not_written(tiny_bert, sentiment_csv, tmp_path, caplog):
    cfg = _cfg(tiny_bert, sentiment_csv, tmp_path, unfreeze_depth=1)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"cache_max_mb": 0.001})})
    plan = plan_cache(cfg, load_datasets(cfg.data, seed=0), tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="tl_ray.train"):
        assert build_cache(plan, cfg.model_dump(), _tables(TEXTS * 20), num_labels=2) is None
    assert "over train.cache_max_mb=0.001" in caplog.text
    assert not plan.folder.exists() and not list(plan.folder.parent.glob(".*.tmp"))


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
    folder = build_cache(plan, cfg.model_dump(), _tables(TEXTS), num_labels=2)
    backbone = get_backbone(cfg.backbone)
    torch.manual_seed(0)
    model = backbone.build(2).eval()
    rows = np.array([2, 3, 1])  # "brilliant" is unknown: the zero vector, fixed
    with torch.no_grad():
        expected = model(**backbone.preprocess([TEXTS[i] for i in rows], 16))
        cached = model(**FeatureCache(folder).batch("train", rows))
    torch.testing.assert_close(cached, expected, atol=1e-5, rtol=1e-4)
    for change in ({"unfreeze_depth": 1}, {"oov": "learned"}):  # the embedding output trains
        other = parse_config({**raw, "backbone": {**raw["backbone"], **change}})
        assert plan_cache(other, datasets, tmp_path) is None
