"""Train, update and evaluate Word2Vec / FastText models with gensim, streaming the corpus.

`train_model` and `update_model` are plain functions (the CLI runs them as a Ray task through
`run_as_task`); `evaluate` scores any vectors file on the word-similarity and analogy sets that
ship in gensim's test data. The corpus is tokenised exactly as the word-vectors backbone
tokenises text, so a trained model's vocabulary matches what the classifier looks up.

Example:
    >>> train_model("corpus.txt", "w2v.model", vector_size=100, epochs=5)   # doctest: +SKIP
    {'model': '/abs/w2v.model', 'words': 1762, ...}
    >>> update_model("w2v.model", "new.txt", "w2v-new.model")              # doctest: +SKIP
    {'words_added': 312, 'shared_words': 1762, 'mean_cosine_old_new': 0.93, ...}
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from tl_ray.backbones.word_vectors_io import tokenize
from tl_ray.errors import ConfigError, DataError, TLRayError
from tl_ray.extras import require
from tl_ray.io import atomic_path

__all__ = ["Corpus", "evaluate", "run_as_task", "train_model", "update_model"]

ARCHS = ("word2vec", "fasttext")
MAX_SENTENCE = 10_000  # gensim ignores tokens past 10,000 in one sentence; split instead


class Corpus:
    """Token lists from a text file (one sentence or document per line) or a folder of files.

    Streams: each pass reopens the files, so gensim can iterate it once per epoch. Tokens
    like `__label__pos` (fastText labels) are dropped.
    """

    def __init__(self, path: str | Path, *, encoding: str = "utf-8", lowercase: bool = False):
        self.path = Path(path).expanduser()
        self.encoding, self.lowercase = encoding, lowercase
        try:
            "".encode(encoding)
        except LookupError:
            raise ConfigError(f"--encoding: unknown encoding {encoding!r}") from None
        if self.path.is_dir():
            self.files = sorted(p for p in self.path.rglob("*")
                                if p.is_file() and not any(part.startswith(".") for part in p.parts))
        elif self.path.is_file():
            self.files = [self.path]
        else:
            raise DataError(f"corpus not found: {self.path}")
        if not any(True for _ in self):
            raise DataError(f"corpus {self.path} has no words (empty or blank files)")

    def __iter__(self) -> Iterator[list[str]]:
        for file in self.files:
            with file.open("rb") as handle:
                for number, raw in enumerate(handle, 1):
                    try:
                        line = raw.decode(self.encoding)
                    except UnicodeDecodeError:
                        raise DataError(
                            f"{file}: line {number} is not valid {self.encoding}; pass "
                            "--encoding (e.g. cp1252 or latin-1)"
                        ) from None
                    tokens = [t for t in tokenize(line.lower() if self.lowercase else line)
                              if not t.startswith("__label__")]
                    for start in range(0, len(tokens), MAX_SENTENCE):
                        yield tokens[start : start + MAX_SENTENCE]


def _progress(label: str) -> Any:
    from gensim.models.callbacks import CallbackAny2Vec

    class EpochProgress(CallbackAny2Vec):
        """One stderr line per epoch: number, seconds, and the running loss where gensim has it."""

        def __init__(self) -> None:
            self.epoch, self.started, self.loss = 0, time.perf_counter(), 0.0

        def on_epoch_end(self, model: Any) -> None:
            self.epoch += 1
            loss = model.get_latest_training_loss() if model.compute_loss else 0.0
            shown = f"  loss {loss - self.loss:.1f}" if loss else ""
            self.loss = loss
            print(f"{label} epoch {self.epoch}/{model.epochs}: "
                  f"{time.perf_counter() - self.started:.1f}s{shown}", file=sys.stderr, flush=True)

    return EpochProgress()


def _save_atomic(model: Any, out: Path) -> None:
    """One self-contained file (no side .npy files), renamed into place."""
    with atomic_path(out) as tmp:
        model.save(str(tmp), sep_limit=sys.maxsize)  # sub-objects ignore `separately`


def train_model(
    corpus: str | Path, out: str | Path, *, arch: str = "word2vec", vector_size: int = 100,
    window: int = 5, min_count: int = 5, epochs: int = 5, workers: int = 1, seed: int = 0,
    encoding: str = "utf-8", lowercase: bool = False, bucket: int = 2_000_000,
    skip_gram: bool = False,
) -> dict[str, Any]:
    """Train a Word2Vec or FastText model (CBOW, or skip-gram) on `corpus`; write it to `out`.

    `bucket` (FastText only) is the number of n-gram rows: memory is bucket x vector_size floats.
    """
    require("word-vectors", "tl-ray w2v")
    from gensim.models import FastText, Word2Vec

    if arch not in ARCHS:
        raise ConfigError(f"--arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    for name, value in (("vector-size", vector_size), ("window", window), ("min-count", min_count),
                        ("epochs", epochs), ("workers", workers), ("bucket", bucket)):
        if value < 1:
            raise ConfigError(f"--{name} must be >= 1, got {value}")
    logging.getLogger("gensim").setLevel(logging.WARNING)
    started = time.perf_counter()
    sentences = Corpus(corpus, encoding=encoding, lowercase=lowercase)
    common = dict(vector_size=vector_size, window=window, min_count=min_count, workers=workers,
                  seed=seed, epochs=epochs, sg=int(skip_gram))
    model = Word2Vec(**common) if arch == "word2vec" else FastText(bucket=bucket, **common)
    model.build_vocab(corpus_iterable=sentences)
    if len(model.wv) == 0:
        raise DataError(f"no word of {sentences.path} occurs --min-count={min_count} times")
    model.train(corpus_iterable=sentences, total_examples=model.corpus_count, epochs=epochs,
                compute_loss=arch == "word2vec", callbacks=[_progress("train")])
    out = Path(out).expanduser().resolve()
    _save_atomic(model, out)
    return {"model": str(out), "arch": arch, "skip_gram": skip_gram, "words": len(model.wv),
            "vector_size": vector_size,
            "epochs": epochs, "sentences": model.corpus_count, "corpus_words": model.corpus_total_words,
            "seconds": round(time.perf_counter() - started, 2)}


def _load_trainable(path: Path) -> Any:
    from gensim.models import Word2Vec
    from gensim.utils import SaveLoad

    if not path.is_file():
        raise DataError(f"model not found: {path}")
    try:
        model = SaveLoad.load(str(path))
    except Exception as error:  # noqa: BLE001  (pickle, numpy and gensim errors alike)
        raise DataError(f"{path} is not a gensim model saved by `tl-ray w2v train` "
                        f"({type(error).__name__})") from None
    if not isinstance(model, Word2Vec):  # FastText is a Word2Vec
        raise DataError(f"{path} holds a {type(model).__name__}, not a trainable Word2Vec/FastText "
                        "model; update needs the .model that `tl-ray w2v train` writes")
    return model


def update_model(
    model_path: str | Path, corpus: str | Path, out: str | Path, *, epochs: int | None = None,
    encoding: str = "utf-8", lowercase: bool = False,
) -> dict[str, Any]:
    """Add `corpus`'s new words to a trained model and train on `corpus` only; write to `out`.

    Reports the words added and how the vectors of the words the model already had moved
    (cosine between each old and new vector). The input model is never written.
    """
    require("word-vectors", "tl-ray w2v")
    import numpy as np

    model_path, out = Path(model_path).expanduser().resolve(), Path(out).expanduser().resolve()
    if out == model_path or (out.exists() and model_path.exists() and out.samefile(model_path)):
        raise ConfigError(f"--out {out} is the input model; write the update to a new file")
    if epochs is not None and epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {epochs}")
    logging.getLogger("gensim").setLevel(logging.WARNING)
    started = time.perf_counter()
    sentences = Corpus(corpus, encoding=encoding, lowercase=lowercase)
    model = _load_trainable(model_path)
    old_words = list(model.wv.index_to_key)
    old_vectors = np.array(model.wv.vectors[: len(old_words)], dtype=np.float32)
    model.build_vocab(corpus_iterable=sentences, update=True, keep_raw_vocab=True)
    seen = np.array([w in model.raw_vocab for w in old_words], dtype=bool)  # in the new text
    model.raw_vocab = {}
    epochs = epochs or model.epochs
    model.train(corpus_iterable=sentences, total_examples=model.corpus_count, epochs=epochs,
                compute_loss=not hasattr(model.wv, "vectors_ngrams"),
                callbacks=[_progress("update")])
    rows = [model.wv.key_to_index[w] for w in old_words]
    new_vectors = np.asarray(model.wv.vectors[rows], dtype=np.float32)
    norms = np.linalg.norm(old_vectors, axis=1) * np.linalg.norm(new_vectors, axis=1)
    cosine = (old_vectors * new_vectors).sum(1) / np.maximum(norms, 1e-12)
    _save_atomic(model, out)
    return {
        "model": str(out), "input_model": str(model_path), "words_before": len(old_words),
        "words_after": len(model.wv), "words_added": len(model.wv) - len(old_words),
        "shared_words": len(old_words), "epochs": epochs, "sentences": model.corpus_count,
        "mean_cosine_old_new": round(float(cosine.mean()), 4),
        "median_cosine_old_new": round(float(np.median(cosine)), 4),
        "min_cosine_old_new": round(float(cosine.min()), 4),
        "old_words_in_new_text": int(seen.sum()),
        "mean_cosine_old_words_in_new_text": round(float(cosine[seen].mean()), 4) if seen.any() else None,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _number(value: Any) -> float | None:
    value = float(value)
    return None if math.isnan(value) else round(value, 4)


def evaluate(path: str | Path) -> dict[str, Any]:
    """Word similarity (WordSim-353, SimLex-999) and analogies (Google questions-words).

    Correlations are over the pairs whose words are both in the vocabulary (`oov_percent` of
    pairs are skipped); analogy accuracy is over the questions with all four words known.
    """
    require("word-vectors", "tl-ray w2v")
    import gensim

    from tl_ray.backbones.word_vectors_io import load_keyed_vectors

    logging.getLogger("gensim").setLevel(logging.ERROR)
    kv, source_format = load_keyed_vectors(path)
    data = Path(gensim.__file__).parent / "test" / "test_data"
    result: dict[str, Any] = {"model": str(Path(path).expanduser().resolve()), "format": source_format,
                              "words": len(kv.index_to_key)}
    for name, file in (("wordsim353", "wordsim353.tsv"), ("simlex999", "simlex999.txt")):
        try:
            pearson, spearman, oov = kv.evaluate_word_pairs(str(data / file))
            result[name] = {"pearson": _number(pearson[0]), "spearman": _number(spearman[0]),
                            "oov_percent": _number(oov)}
        except (ValueError, ZeroDivisionError):  # no pair has both words in the vocabulary
            result[name] = {"pearson": None, "spearman": None, "oov_percent": 100.0}
    score, sections = kv.evaluate_word_analogies(str(data / "questions-words.txt"))
    total = sections[-1] if sections else {"correct": [], "incorrect": []}
    answered = len(total["correct"]) + len(total["incorrect"])
    result["analogies"] = {"accuracy": _number(score) if answered else None,
                           "correct": len(total["correct"]), "answered": answered}
    return result


def run_as_task(fn: Callable[..., dict[str, Any]], *, cpus: int, address: str | None = None,
                **kwargs: Any) -> dict[str, Any]:
    """Run `fn(**kwargs)` as a Ray task holding `cpus` CPUs (local Ray or `address`)."""
    import ray

    from tl_ray import ray_logs
    from tl_ray.train.driver import ensure_ray

    ensure_ray(address)
    if "out" in kwargs:  # under `tl-ray`: Ray's output beside the model it writes
        ray_logs.log_to(Path(kwargs["out"]).parent)
    if cpus < 1:
        raise ConfigError(f"--workers must be >= 1, got {cpus}")
    available = ray.cluster_resources().get("CPU", 0)
    if cpus > available:
        raise ConfigError(f"--workers {cpus} exceeds the {available:g} CPUs of the Ray cluster")
    task = ray.remote(num_cpus=cpus, max_retries=0)(fn)
    try:
        return ray.get(task.remote(**kwargs))
    except ray.exceptions.RayTaskError as error:
        cause = getattr(error, "cause", None)
        if isinstance(cause, TLRayError):
            raise cause from None
        raise
