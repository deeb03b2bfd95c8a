"""Load labeled text data, split it, and encode its labels; pure Python + pyarrow, no Ray.

The readers live here; the label map, split and encoding they share with tl_ray.images live
in tl_ray.labels (re-exported here: `from tl_ray.data import LabelMap` keeps working).

Example:
    >>> ds = load_datasets(DataConfig(path="reviews.csv"), seed=0)  # doctest: +SKIP
    >>> ds.labels.labels, ds.train.column_names  # doctest: +SKIP
    (('neg', 'pos'), ['text', 'label'])
"""

from __future__ import annotations

import codecs
import io
import json
import logging
import re
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from tl_ray.errors import DataError
from tl_ray.images import load_image_datasets
from tl_ray.labels import (
    Datasets,
    LabelMap,
    as_string,
    build_datasets,
    encode_labels,
    require_columns,
    shown,
    stratified_split,
)

if TYPE_CHECKING:
    from tl_ray.config import DataConfig

__all__ = ["Datasets", "LabelMap", "encode_labels", "load_datasets", "read_table", "stratified_split"]

_FASTTEXT_PREFIX = "__label__"
_FASTTEXT_LINE = re.compile(r"__label__(\S*)((?:\s+__label__\S*)*)(.*)", re.DOTALL)


# ---------------------------------------------------------------- readers


def _first_line(error: BaseException) -> str:
    """The first line of an error's text (its type name if it has none), cut to 200 characters."""
    return (str(error).splitlines() or [type(error).__name__])[0][:200]


def _decode_error(path: Path, encoding: str, error: UnicodeError | None = None) -> DataError:
    """A DataError naming the first offset where `path`'s bytes are not valid `encoding`."""
    offset = error.start if isinstance(error, UnicodeDecodeError) else None
    if offset is None:
        try:
            path.read_bytes().decode(encoding)
        except UnicodeDecodeError as again:
            offset = again.start
        except UnicodeError:
            pass
    where = "some bytes" if offset is None else f"bytes at offset {offset}"
    return DataError(f"{path}: {where} are not valid {encoding}; pass data.encoding (e.g. latin-1) to read it")


def _read_text(path: Path, encoding: str) -> str:
    codec = "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding
    try:
        text = path.read_bytes().decode(codec)
        text.encode("utf-8")  # a codec such as unicode_escape can give lone surrogates
    except UnicodeError as error:
        raise _decode_error(path, encoding, error) from None
    return text


def _read_delimited(path: Path, encoding: str, columns: Sequence[str], delimiter: str) -> pa.Table:
    convert = pacsv.ConvertOptions(column_types={name: pa.string() for name in columns})
    # pyarrow reads UTF-8 itself; another encoding is decoded here, as the other readers do
    # (pyarrow's own transcoding hands codecs a Buffer, which some, e.g. punycode, cannot take).
    source = path if codecs.lookup(encoding).name == "utf-8" else io.BytesIO(_read_text(path, encoding).encode())
    try:
        return pacsv.read_csv(source, pacsv.ReadOptions(), pacsv.ParseOptions(delimiter=delimiter), convert)
    except pa.ArrowException as error:
        if "utf8" in str(error).lower():
            raise _decode_error(path, encoding) from None
        raise DataError(f"{path}: {_first_line(error)}") from None


def _parse_jsonl(text: str, path: Path) -> pa.Table:
    """Slow path for what pyarrow rejects (mixed value types, bad lines), naming the bad line."""
    rows = []
    for number, line in enumerate(text.split("\n"), 1):
        try:
            row = json.loads(line) if line.strip() else {}
        except (ValueError, RecursionError):  # RecursionError: nested too deep
            raise DataError(f"{path}: line {number} is not valid JSON") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {number} is not a JSON object")
        if row:
            rows.append({k: v if v is None or isinstance(v, str) else json.dumps(v) for k, v in row.items()})
    try:
        return pa.Table.from_pylist(rows)
    except (UnicodeError, pa.ArrowException) as error:  # e.g. a lone surrogate escape "\ud800"
        raise DataError(f"{path}: cannot be read as a table: {_first_line(error)}") from None


def _read_jsonl(path: Path, encoding: str, columns: Sequence[str]) -> pa.Table:
    text = _read_text(path, encoding)
    try:
        return pajson.read_json(io.BytesIO(text.encode("utf-8")))
    except pa.ArrowException:
        return _parse_jsonl(text, path)


def _read_parquet(path: Path, encoding: str, columns: Sequence[str]) -> pa.Table:
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path} is not a readable parquet file: {_first_line(error)}") from None


def _read_fasttext(path: Path, encoding: str, columns: Sequence[str]) -> pa.Table:
    texts, labels = [], []
    for number, line in enumerate(_read_text(path, encoding).split("\n"), 1):
        line = line.strip()
        if not line:
            continue
        if not line.startswith(_FASTTEXT_PREFIX):
            raise DataError(f"{path}: line {number} has no __label__ prefix; expected '__label__NAME text'")
        match = _FASTTEXT_LINE.fullmatch(line)  # extra __label__ tokens after the first are dropped
        labels.append(match.group(1))
        texts.append(match.group(3).strip())
    return pa.table({"text": pa.array(texts, pa.string()), "label": pa.array(labels, pa.string())})


_READERS: dict[str, Callable[[Path, str, Sequence[str]], pa.Table]] = {
    ".csv": partial(_read_delimited, delimiter=","),
    ".tsv": partial(_read_delimited, delimiter="\t"),
    ".jsonl": _read_jsonl,
    ".ndjson": _read_jsonl,
    ".parquet": _read_parquet,
    ".txt": _read_fasttext,
    ".cor": _read_fasttext,
}


# ---------------------------------------------------------------- checks


def _select(raw: pa.Table, path: Path, text_column: str, label_column: str) -> pa.Table:
    require_columns(raw, path, (text_column, label_column))
    text = as_string(raw.column(text_column), path, text_column)
    label = pc.utf8_trim_whitespace(as_string(raw.column(label_column), path, label_column))
    return pa.table({"text": text, "label": label})


def _blank(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """True where a string is null, empty or whitespace only."""
    return pc.fill_null(pc.equal(pc.utf8_trim_whitespace(column), ""), True)


def _count_first(mask: pa.ChunkedArray) -> tuple[int, int]:
    """(how many True, 1-based row of the first True)."""
    return pc.sum(mask).as_py() or 0, pc.index(mask, True).as_py() + 1


def _clean(table: pa.Table, path: Path, empty_text: str) -> pa.Table:
    no_text = _blank(table.column("text"))
    no_label = pc.and_(_blank(table.column("label")), pc.invert(no_text))
    count, first = _count_first(no_text)
    if count and empty_text == "error":
        raise DataError(f"{path}: {count} rows have empty text (first at data row {first}); "
                        "fix them or set data.empty_text: skip")
    missing, first_missing = _count_first(no_label)
    if missing:
        raise DataError(f"{path}: {missing} rows have no label (first at data row {first_missing})")
    if count:
        logging.getLogger("tl_ray.data").warning(
            "%s: skipped %d rows with empty text (first at data row %d)", path, count, first
        )
        table = table.filter(pc.invert(no_text))
    if table.num_rows == 0:
        raise DataError(f"{path} has no rows with text")
    return table


def _check_encoding(encoding: str, path: Path) -> None:
    try:
        codec = codecs.lookup(encoding)
    except (LookupError, ValueError):  # ValueError: a NUL in the name
        raise DataError(f"unknown encoding '{shown(encoding)}' for {path}") from None
    if not getattr(codec, "_is_text_encoding", True):  # base64, zlib, rot13: bytes <-> bytes
        raise DataError(f"'{shown(encoding)}' is not a text encoding (for {path}); "
                        "use e.g. utf-8, latin-1 or utf-16")


def read_table(
    path: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    encoding: str = "utf-8",
    empty_text: str = "skip",
) -> pa.Table:
    """Read .csv/.tsv/.jsonl/.ndjson/.parquet or fastText-style .txt/.cor into ("text", "label") strings.

    >>> read_table("reviews.tsv", text_column="review", label_column="stars").column_names  # doctest: +SKIP
    ['text', 'label']
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"unsupported data file type '{path.suffix}' for {path}; supported: {', '.join(_READERS)}")
    if empty_text not in ("skip", "error"):
        raise DataError(f"empty_text must be 'skip' or 'error', got '{shown(empty_text)}'")
    if text_column == label_column:
        raise DataError(f"text and label columns are both '{shown(text_column)}'; they must differ")
    _check_encoding(encoding, path)
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty")
    if reader is _read_fasttext:
        text_column, label_column = "text", "label"
    raw = reader(path, encoding, (text_column, label_column))
    try:
        raw.column_names
    except UnicodeDecodeError:  # a parquet file's schema can hold any bytes as a name
        raise DataError(f"{path}: its column names are not valid UTF-8") from None
    if raw.num_rows == 0:
        raise DataError(f"{path} has no data rows")
    return _clean(_select(raw, path, text_column, label_column), path, empty_text)


def load_datasets(cfg: DataConfig, seed: int = 0) -> Datasets:
    """Read cfg.path, build the label map from it, and take validation from a file or a split.

    >>> ds = load_datasets(DataConfig(path="train.csv", validation_split=0.2), seed=1)  # doctest: +SKIP

    A folder, or a table with `data.image_column` set, is read as images (tl_ray.images).
    """
    if cfg.image_column is not None or Path(cfg.path).is_dir():
        return load_image_datasets(cfg, seed)
    read = partial(read_table, text_column=cfg.text_column, label_column=cfg.label_column,
                   encoding=cfg.encoding, empty_text=cfg.empty_text)
    return build_datasets(read(cfg.path), cfg, seed, read_validation=read)
