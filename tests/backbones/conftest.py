"""Fixtures for the backbone tests: tiny word vectors trained here, in seconds."""

from __future__ import annotations

import pytest
from helpers import make_sentiment_rows


@pytest.fixture(scope="session")
def tiny_vectors(tmp_path_factory) -> str:
    """A 16-dimensional gensim FastText model (with n-grams) on the toy sentiment texts."""
    from gensim.models import FastText

    sentences = [text.split() for text, _ in make_sentiment_rows(200)]
    model = FastText(vector_size=16, window=3, min_count=1, bucket=2000, min_n=3, max_n=5,
                     epochs=5, workers=1, seed=0)
    model.build_vocab(sentences)
    model.train(sentences, total_examples=len(sentences), epochs=model.epochs)
    path = tmp_path_factory.mktemp("vectors") / "tiny-fasttext.model"
    model.save(str(path), sep_limit=2**62)  # one file
    return str(path)
