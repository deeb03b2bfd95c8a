"""Load labeled text data, split it, and encode its labels; pure Python + pyarrow, no Ray.

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
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from tl_ray.errors import DataError

if TYPE_CHECKING:
    from tl_ray.config import DataConfig

__all__ = ["Datasets", "LabelMap", "encode_labels", "load_datasets", "read_table", "stratified_split"]

_FASTTEXT_PREFIX = "__label__"
_FASTTEXT_LINE = re.compile(r"__label__(\S*)((?:\s+__label__\S*)*)(.*)", re.DOTALL)


def _preview(items: Iterable[object], limit: int = 5) -> str:
    items = list(items)
    shown = ", ".join(repr(str(item)) for item in items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


@dataclass(frozen=True)
class LabelMap:
    """Class names by index; the one mapping shared by training, checkpoints and serving.

    >>> labels = LabelMap.from_values(["pos", "neg", "pos"])
    >>> labels.labels, labels.encode(["pos"]), labels.decode([0])
    (('neg', 'pos'), [1], ['neg'])
    """

    labels: tuple[str, ...]
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        labels = tuple(self.labels)
        if not all(isinstance(label, str) for label in labels):
            raise DataError(f"label names must be strings, got {labels!r}")
        index = {label: i for i, label in enumerate(labels)}
        if len(index) != len(labels):
            raise DataError(f"label names must be unique, got {_preview(labels, 20)}")
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "_index", index)

    def __len__(self) -> int:
        return len(self.labels)

    def encode(self, values: Sequence[str]) -> list[int]:
        """Label names -> ids; DataError naming any name not in the map."""
        unknown = sorted({value for value in values if value not in self._index})
        if unknown:
            raise DataError(f"unknown label(s) {_preview(unknown)}; known labels: {_preview(self.labels)}")
        return [self._index[value] for value in values]

    def decode(self, ids: Sequence[int]) -> list[str]:
        """Ids -> label names; DataError for an id outside 0..len-1."""
        bad = [int(i) for i in ids if not 0 <= int(i) < len(self.labels)]
        if bad:
            raise DataError(f"label id {bad[0]} is out of range for {len(self.labels)} labels")
        return [self.labels[int(i)] for i in ids]

    def save(self, path: str | Path) -> None:
        """Write {"labels": [...]} as JSON atomically (temp file in the same folder, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump({"labels": list(self.labels)}, handle, ensure_ascii=False, indent=2)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> LabelMap:
        """Read a file written by `save`; DataError if it is missing or malformed."""
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"label map not found: {path}") from None
        except (OSError, ValueError) as error:
            raise DataError(f"{path} is not a valid label map: {error}") from None
        labels = raw.get("labels") if isinstance(raw, dict) else None
        if not isinstance(labels, list):
            raise DataError(f'{path} is not a valid label map: expected {{"labels": ["name", ...]}}')
        try:
            return cls(tuple(labels))
        except DataError as error:
            raise DataError(f"{path}: {error}") from None

    @classmethod
    def from_values(cls, values: Iterable[str], *, column: str = "label") -> LabelMap:
        """Sorted unique labels (numerically when all look like integers: "2" before "10").

        >>> LabelMap.from_values(["10", "2", "2"]).labels
        ('2', '10')
        """
        unique = {str(value) for value in values}
        if len(unique) < 2:
            found = f"only one class ({next(iter(unique))!r})" if unique else "no labels"
            raise DataError(f"label column '{column}' has {found}; a classifier needs at least two")
        if all(re.fullmatch(r"[+-]?\d+", value) for value in unique):
            return cls(tuple(sorted(unique, key=lambda value: (int(value), value))))
        return cls(tuple(sorted(unique)))


@dataclass(frozen=True)
class Datasets:
    """Train and validation tables ("text": string, "label": int64 ids) and their label map."""

    train: pa.Table
    validation: pa.Table
    labels: LabelMap


# ---------------------------------------------------------------- readers


def _decode_error(path: Path, encoding: str, offset: int | None = None) -> DataError:
    if offset is None:
        try:
            path.read_bytes().decode(encoding)
        except UnicodeDecodeError as error:
            offset = error.start
    where = "some bytes" if offset is None else f"bytes at offset {offset}"
    return DataError(f"{path}: {where} are not valid {encoding}; pass data.encoding (e.g. latin-1) to read it")


def _read_text(path: Path, encoding: str) -> str:
    codec = "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding
    try:
        return path.read_bytes().decode(codec)
    except UnicodeDecodeError as error:
        raise _decode_error(path, encoding, error.start) from None


def _read_delimited(path: Path, encoding: str, columns: Sequence[str], delimiter: str) -> pa.Table:
    convert = pacsv.ConvertOptions(column_types={name: pa.string() for name in columns})
    try:
        return pacsv.read_csv(
            path, pacsv.ReadOptions(encoding=encoding), pacsv.ParseOptions(delimiter=delimiter), convert
        )
    except UnicodeDecodeError as error:
        raise _decode_error(path, encoding, error.start) from None
    except pa.ArrowInvalid as error:
        if "utf8" in str(error).lower():
            raise _decode_error(path, encoding) from None
        raise DataError(f"{path}: {str(error).splitlines()[0][:200]}") from None


def _parse_jsonl(text: str, path: Path) -> pa.Table:
    """Slow path for what pyarrow rejects (mixed value types, bad lines), naming the bad line."""
    rows = []
    for number, line in enumerate(text.split("\n"), 1):
        try:
            row = json.loads(line) if line.strip() else {}
        except ValueError:
            raise DataError(f"{path}: line {number} is not valid JSON") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {number} is not a JSON object")
        if row:
            rows.append({k: v if v is None or isinstance(v, str) else json.dumps(v) for k, v in row.items()})
    return pa.Table.from_pylist(rows)


def _read_jsonl(path: Path, encoding: str, columns: Sequence[str]) -> pa.Table:
    text = _read_text(path, encoding)
    try:
        return pajson.read_json(io.BytesIO(text.encode("utf-8")))
    except pa.ArrowInvalid:
        return _parse_jsonl(text, path)


def _read_parquet(path: Path, encoding: str, columns: Sequence[str]) -> pa.Table:
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path} is not a readable parquet file: {str(error).splitlines()[0]}") from None


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


def _as_string(column: pa.ChunkedArray, path: Path, name: str) -> pa.ChunkedArray:
    if pa.types.is_string(column.type):
        return column
    try:
        return pc.cast(column, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise DataError(f"{path}: column '{name}' has type {column.type}, which cannot be read as text") from None


def _select(raw: pa.Table, path: Path, text_column: str, label_column: str) -> pa.Table:
    for name in (text_column, label_column):
        if name not in raw.column_names:
            raise DataError(f"column '{name}' not found in {path}; columns are: {', '.join(raw.column_names)}")
        if raw.column_names.count(name) > 1:
            raise DataError(f"column '{name}' appears {raw.column_names.count(name)} times in {path}")
    text = _as_string(raw.column(text_column), path, text_column)
    label = pc.utf8_trim_whitespace(_as_string(raw.column(label_column), path, label_column))
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
        raise DataError(f"empty_text must be 'skip' or 'error', got {empty_text!r}")
    if text_column == label_column:
        raise DataError(f"text and label columns are both '{text_column}'; they must differ")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise DataError(f"unknown encoding {encoding!r} for {path}") from None
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty")
    if reader is _read_fasttext:
        text_column, label_column = "text", "label"
    raw = reader(path, encoding, (text_column, label_column))
    if raw.num_rows == 0:
        raise DataError(f"{path} has no data rows")
    return _clean(_select(raw, path, text_column, label_column), path, empty_text)


# ---------------------------------------------------------------- split and encode


def stratified_split(table: pa.Table, fraction: float, seed: int) -> tuple[pa.Table, pa.Table]:
    """Seeded per-class split into (train, validation); each class keeps >= 1 row on each side.

    >>> train, val = stratified_split(read_table("reviews.csv"), 0.1, seed=0)  # doctest: +SKIP
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"validation fraction must be between 0 and 1, got {fraction}")
    values = table.column("label").to_numpy(zero_copy_only=False)
    classes, inverse = np.unique(values, return_inverse=True)
    rng = np.random.default_rng(seed)
    in_validation = np.zeros(table.num_rows, dtype=bool)
    for k, name in enumerate(classes):
        rows = np.flatnonzero(inverse == k)
        if len(rows) < 2:
            raise DataError(f"class {str(name)!r} has only {len(rows)} row; a validation split needs "
                            "at least 2 rows per class (or give data.validation_path)")
        size = min(max(1, math.floor(fraction * len(rows) + 0.5)), len(rows) - 1)
        in_validation[rng.choice(rows, size=size, replace=False)] = True
    return table.filter(pa.array(~in_validation)), table.filter(pa.array(in_validation))


def _unknown_labels(column: pa.ChunkedArray, labels: LabelMap) -> tuple[pa.Array, list[str]]:
    ids = pc.index_in(column, value_set=pa.array(labels.labels, pa.string()))
    unknown = pc.unique(pc.filter(column, pc.is_null(ids))).to_pylist() if ids.null_count else []
    return ids, sorted(unknown)


def encode_labels(table: pa.Table, labels: LabelMap) -> pa.Table:
    """Replace the string "label" column by int64 ids from `labels`.

    >>> encode_labels(pa.table({"text": ["a"], "label": ["pos"]}), LabelMap(("neg", "pos"))).column("label")[0]
    <pyarrow.Int64Scalar: 1>
    """
    column = table.column("label")
    if not pa.types.is_string(column.type):
        raise DataError(f"encode_labels expects a string 'label' column, got {column.type}")
    ids, unknown = _unknown_labels(column, labels)
    if unknown:
        raise DataError(f"unknown label(s) {_preview(unknown)}; known labels: {_preview(labels.labels)}")
    return table.set_column(table.column_names.index("label"), "label", pc.cast(ids, pa.int64()))


def load_datasets(cfg: DataConfig, seed: int = 0) -> Datasets:
    """Read cfg.path, build the label map from it, and take validation from a file or a split.

    >>> ds = load_datasets(DataConfig(path="train.csv", validation_split=0.2), seed=1)  # doctest: +SKIP

    A folder, or a table with `data.image_column` set, is read as images (tl_ray.images).
    """
    if cfg.image_column is not None or Path(cfg.path).is_dir():
        from tl_ray.images import load_image_datasets

        return load_image_datasets(cfg, seed)
    options = dict(text_column=cfg.text_column, label_column=cfg.label_column,
                   encoding=cfg.encoding, empty_text=cfg.empty_text)
    train = read_table(cfg.path, **options)
    try:
        labels = LabelMap.from_values(pc.unique(train.column("label")).to_pylist(), column=cfg.label_column)
        if cfg.validation_path is None:
            train, validation = stratified_split(train, cfg.split_fraction, seed)
    except DataError as error:
        raise DataError(f"{cfg.path}: {error}") from None
    if cfg.validation_path is not None:
        validation = read_table(cfg.validation_path, **options)
        _, unknown = _unknown_labels(validation.column("label"), labels)
        if unknown:
            raise DataError(f"{cfg.validation_path} has label(s) not in the training data {cfg.path}: "
                            f"{_preview(unknown)}; known labels: {_preview(labels.labels)}")
    return Datasets(encode_labels(train, labels), encode_labels(validation, labels), labels)
