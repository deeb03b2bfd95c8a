"""Word vectors in and out: gensim loaders for every common format, a tokenizer, a vocabulary.

This module needs numpy only; gensim is imported inside `load_vectors`, so a saved
checkpoint (vocabulary + matrices) serves without gensim or the original vectors file.
fastText subword vectors of unknown words are computed exactly as gensim does (same
n-grams, same FNV-1a hash, same bucket), from the n-gram matrix stored in the checkpoint.

Example:
    >>> vectors = load_vectors("pang_lee_polarity_fasttext.vec", max_vocab=1000)  # doctest: +SKIP
    >>> vectors.matrix.shape, vectors.source_format                               # doctest: +SKIP
    ((1000, 100), 'word2vec text')
    >>> tokenize("It's a gripping, well-made film.")
    ["It's", 'a', 'gripping', ',', 'well-made', 'film', '.']
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tl_ray.errors import BackboneError
from tl_ray.extras import require

__all__ = [
    "FASTTEXT_MAGIC",
    "Subwords",
    "Vectors",
    "Vocab",
    "char_ngrams",
    "ft_hash",
    "load_keyed_vectors",
    "load_vectors",
    "ngram_buckets",
    "tokenize",
]

# Words, with inner apostrophes and hyphens kept (it's, well-made), or single punctuation marks.
TOKEN = re.compile(r"\w+(?:[-'’]\w+)*|[^\w\s]")
FASTTEXT_MAGIC = 793712314  # first int32 of a Facebook fastText .bin
PAD, UNK = 0, 1  # reserved rows in front of the vocabulary


def tokenize(text: str) -> list[str]:
    """Split text into word and punctuation tokens (no case change)."""
    return TOKEN.findall(text)


# -- fastText subwords, bit-exact with gensim.models.fasttext.ft_ngram_hashes -----------------


def char_ngrams(word: str, min_n: int, max_n: int) -> list[str]:
    """Character n-grams of `<word>` as fastText takes them (lone `<` / `>` excluded)."""
    text = f"<{word}>"
    size = len(text)
    grams = []
    for start in range(size):
        for n in range(min_n, max_n + 1):
            if start + n > size:
                break
            if n == 1 and (start == 0 or start + n == size):
                continue
            grams.append(text[start : start + n])
    return grams


def ft_hash(data: bytes) -> int:
    """fastText's 32-bit FNV-1a variant, bytes taken as signed chars (gensim ft_hash_bytes)."""
    value = 2166136261
    for byte in data:
        value ^= byte if byte < 128 else byte | 0xFFFFFF00
        value = (value * 16777619) & 0xFFFFFFFF
    return value


def ngram_buckets(word: str, min_n: int, max_n: int, bucket: int) -> list[int]:
    """Rows of the n-gram matrix whose mean is the vector of the unknown `word`."""
    return [ft_hash(gram.encode("utf-8")) % bucket for gram in char_ngrams(word, min_n, max_n)]


# -- loading ---------------------------------------------------------------------------------


@dataclass
class Subwords:
    """fastText n-gram vectors: row `ft_hash(gram) % bucket` of `matrix`."""

    min_n: int
    max_n: int
    matrix: np.ndarray  # (bucket, dim) float32


@dataclass
class Vectors:
    """Words in frequency order, their vectors, and the n-gram vectors if the source has them."""

    words: list[str]
    matrix: np.ndarray  # (len(words), dim) float32
    subwords: Subwords | None
    source_format: str


def _gensim_saved(path: str, limit: int | None) -> Any:
    from gensim.models import KeyedVectors
    from gensim.utils import SaveLoad

    obj = SaveLoad.load(path)
    kv = getattr(obj, "wv", obj)
    if not isinstance(kv, KeyedVectors):
        raise ValueError(f"holds a {type(obj).__name__}, not word vectors")
    return kv


def _fasttext_bin(path: str, limit: int | None) -> Any:
    from gensim.models.fasttext import load_facebook_vectors

    return load_facebook_vectors(path)


def _word2vec(binary: bool, no_header: bool = False) -> Callable[[str, int | None], Any]:
    def load(path: str, limit: int | None) -> Any:
        from gensim.models import KeyedVectors

        # fastText writes words as raw bytes (pang_lee_polarity_fasttext.vec holds cp1252):
        # undecodable words get U+FFFD instead of failing the whole file.
        return KeyedVectors.load_word2vec_format(
            path, binary=binary, limit=limit, no_header=no_header, unicode_errors="replace"
        )

    return load


LOADERS: dict[str, Callable[[str, int | None], Any]] = {
    "gensim saved model/KeyedVectors": _gensim_saved,
    "Facebook fastText .bin": _fasttext_bin,
    "word2vec binary": _word2vec(binary=True),
    "word2vec text": _word2vec(binary=False),
    "GloVe text (no header)": _word2vec(binary=False, no_header=True),
}
SAVED, FASTTEXT, W2V_BIN, W2V_TEXT, GLOVE = LOADERS


def _head(path: Path, size: int = 4096) -> bytes:
    with path.open("rb") as handle:
        return handle.read(size)


def _looks_like_text(head: bytes) -> bool:
    """Plain-text vectors: no NUL bytes and the first lines decode as UTF-8."""
    if b"\0" in head:
        return False
    lines = head.split(b"\n")[:-1] or [head]
    try:
        b"\n".join(lines).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _format_order(path: Path) -> list[str]:
    """Formats to try, most likely first, from the file's first bytes (and name if compressed)."""
    head = _head(path)
    text = [W2V_TEXT, GLOVE]
    if len(head) >= 4 and int.from_bytes(head[:4], "little", signed=True) == FASTTEXT_MAGIC:
        return [FASTTEXT]  # unmistakable; the other readers would only misread it
    if path.suffix.lower() in (".gz", ".bz2"):  # gensim decompresses; go by the inner suffix
        inner = Path(path.stem).suffix.lower()
        return [W2V_BIN, *text] if inner == ".bin" else [*text, W2V_BIN]
    if head[:1] == b"\x80":  # a pickle: gensim's own save()
        return [SAVED, W2V_BIN, *text]
    if _looks_like_text(head):
        return [*text, W2V_BIN, SAVED]
    return [W2V_BIN, SAVED, *text]


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def load_keyed_vectors(path: str | Path, max_vocab: int | None = None) -> tuple[Any, str]:
    """(gensim KeyedVectors, format name) of a vectors file, trying the formats that fit it.

    Raises BackboneError naming the formats tried when none reads the file.
    """
    return _load(Path(path).expanduser(), max_vocab, keep_gensim=True)


def load_vectors(path: str | Path, max_vocab: int | None = None) -> Vectors:
    """Read word vectors with gensim, trying the formats that fit the file in turn.

    `max_vocab` keeps the first (most frequent) words only. Raises BackboneError naming the
    formats tried when none reads the file.
    """
    return _load(Path(path).expanduser(), max_vocab, keep_gensim=False)


def _load(path: Path, max_vocab: int | None, keep_gensim: bool) -> Any:
    require("word-vectors", "reading a word vectors file")
    logging.getLogger("gensim").setLevel(logging.WARNING)  # not one INFO line per load
    if not path.is_file():
        raise BackboneError(f"backbone.vectors: file not found: {path}")
    if path.stat().st_size == 0:
        raise BackboneError(f"backbone.vectors: {path} is empty")
    tried, errors = [], []
    for name in _format_order(path):
        tried.append(name)
        try:
            kv = LOADERS[name](str(path), max_vocab)
            vectors = _from_keyed_vectors(kv, name, max_vocab)
        except Exception as error:  # noqa: BLE001  (each reader fails in its own way)
            errors.append(_first_line(error))
            continue
        return (kv, name) if keep_gensim else vectors
    raise BackboneError(
        f"backbone.vectors: cannot read {path} as word vectors; tried {', '.join(tried)} "
        f"(first error: {errors[0]})"
    )


def _from_keyed_vectors(kv: Any, source_format: str, max_vocab: int | None) -> Vectors:
    words = list(kv.index_to_key[:max_vocab] if max_vocab else kv.index_to_key)
    matrix = np.asarray(kv.vectors[: len(words)], dtype=np.float32)
    if not words or matrix.ndim != 2 or matrix.shape[1] == 0:
        raise ValueError("no word vectors in the file")
    if not np.isfinite(matrix).all():
        raise ValueError("vectors contain NaN or infinity")
    subwords = None
    ngrams = getattr(kv, "vectors_ngrams", None)
    if getattr(kv, "bucket", 0) and ngrams is not None and len(ngrams):
        subwords = Subwords(int(kv.min_n), int(kv.max_n), np.asarray(ngrams, dtype=np.float32))
    return Vectors(words, matrix, subwords, source_format)


# -- the vocabulary a checkpoint carries ------------------------------------------------------


@dataclass
class Vocab:
    """Token -> row lookup: row 0 pads, row 1 is the unknown word, words start at row 2.

    A fully lower-case vocabulary lower-cases input; otherwise the exact token is tried first,
    then its lower-case form. With `oov == "subword"` unknown tokens get batch-local rows
    (`size + j`) whose vectors are the mean of their fastText n-gram rows.
    """

    words: list[str]
    oov: str  # subword | learned | zero
    lowercase: bool
    min_n: int = 0
    max_n: int = 0
    ngrams: np.ndarray | None = field(default=None, repr=False)  # (bucket, dim), subword only
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.index = {word: row for row, word in enumerate(self.words, start=2)}
        self._oov_cache: dict[str, np.ndarray] = {}
        if self.oov == "subword" and self.ngrams is None:
            raise ValueError("oov 'subword' needs the n-gram matrix")

    @property
    def size(self) -> int:
        """Rows of the embedding matrix: pad, unknown, then the words."""
        return len(self.words) + 2

    @staticmethod
    def is_lowercase(words: list[str], sample: int = 50_000) -> bool:
        head = words[:sample]
        return sum(w != w.lower() for w in head) <= 0.001 * len(head)

    def lookup(self, token: str) -> int | None:
        if self.lowercase:
            return self.index.get(token.lower())
        row = self.index.get(token)
        return self.index.get(token.lower()) if row is None else row

    def oov_vector(self, word: str) -> np.ndarray:
        """gensim's vector for an unknown word: the mean of its n-gram rows (zeros if none)."""
        vector = self._oov_cache.get(word)
        if vector is None:
            rows = ngram_buckets(word, self.min_n, self.max_n, len(self.ngrams))
            vector = (self.ngrams[rows].sum(0) / len(rows) if rows
                      else np.zeros(self.ngrams.shape[1], dtype=np.float32))
            if len(self._oov_cache) < 50_000:
                self._oov_cache[word] = vector
        return vector

    def encode(self, texts: list[str], max_length: int) -> dict[str, np.ndarray]:
        """Padded ids (batch, longest), and for subword OOV the n-gram rows of each unknown."""
        rows: list[list[int]] = []
        unknown: dict[str, int] = {}
        for text in texts:
            ids = []
            for token in tokenize(text)[:max_length]:
                row = self.lookup(token)
                if row is None and self.oov == "subword":
                    key = token.lower() if self.lowercase else token
                    row = self.size + unknown.setdefault(key, len(unknown))
                ids.append(UNK if row is None else row)
            rows.append(ids)
        width = max([1, *map(len, rows)])
        input_ids = np.full((len(rows), width), PAD, dtype=np.int64)
        for i, ids in enumerate(rows):
            input_ids[i, : len(ids)] = ids
        batch = {"input_ids": input_ids}
        if self.oov == "subword":  # one row per distinct unknown word of the batch (>= 1 row)
            vectors = [self.oov_vector(word) for word in unknown]
            batch["oov_vectors"] = np.stack(vectors).astype(np.float32) if vectors else np.zeros(
                (1, self.ngrams.shape[1]), dtype=np.float32)
        return batch

    def to_dict(self) -> dict[str, Any]:
        """Everything but the n-gram matrix (stored beside it as an array)."""
        return {"words": self.words, "oov": self.oov, "lowercase": self.lowercase,
                "min_n": self.min_n, "max_n": self.max_n}
