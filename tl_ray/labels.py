"""Labeled rows -> label map -> train/validation split -> encoded ids, for every reader.

tl_ray.data (text) and tl_ray.images (images) each read a file into a table of one input
column and a string "label" column; from there this module owns the rest: the label map, the
seeded stratified split or the validation file's check against the training labels, and the
int64 ids. Pure numpy + pyarrow; it imports neither reader.

Example:
    >>> rows = pa.table({"text": ["a", "b", "c", "d"], "label": ["x", "y", "x", "y"]})
    >>> cfg = DataConfig(path="d.csv", validation_split=0.5)
    >>> ds = build_datasets(rows, cfg, seed=0, read_validation=read_table)  # doctest: +SKIP
    >>> ds.labels.labels, ds.validation.num_rows  # doctest: +SKIP
    (('x', 'y'), 2)
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tl_ray.errors import brief, shown
from tl_ray.errors import DataError
from tl_ray.io import write_json_atomic

if TYPE_CHECKING:
    from tl_ray.config import DataConfig

__all__ = ["Datasets", "LabelMap", "as_string", "build_datasets", "encode_labels", "preview",
           "require_columns", "shown", "stratified_split", "unknown_labels"]


def preview(items: Iterable[object], limit: int = 5) -> str:
    """The first `limit` items quoted, and how many more.

    >>> preview(["a", "b", "c"], limit=2)
    "'a', 'b' (and 1 more)"
    """
    items = list(items)
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(brief(str(item)) for item in items[:limit]) + more


def _sorted_labels(unique: set[str]) -> tuple[str, ...]:
    """Numerically when every label looks like an integer ("2" before "10"), else as text."""
    if all(re.fullmatch(r"[+-]?\d+", value) for value in unique):
        try:
            return tuple(sorted(unique, key=lambda value: (int(value), value)))
        except ValueError:  # past Python's int-from-string digit limit: sort as text
            pass
    return tuple(sorted(unique))


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
            raise DataError(f"label names must be strings, got {preview(labels, 20)}")
        index = {label: i for i, label in enumerate(labels)}
        if len(index) != len(labels):
            raise DataError(f"label names must be unique, got {preview(labels, 20)}")
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "_index", index)

    def __len__(self) -> int:
        return len(self.labels)

    def encode(self, values: Sequence[str]) -> list[int]:
        """Label names -> ids; DataError naming any name not in the map."""
        unknown = sorted({value for value in values if value not in self._index})
        if unknown:
            raise DataError(f"unknown label(s) {preview(unknown)}; known labels: {preview(self.labels)}")
        return [self._index[value] for value in values]

    def decode(self, ids: Sequence[int]) -> list[str]:
        """Ids -> label names; DataError for an id outside 0..len-1."""
        bad = [int(i) for i in ids if not 0 <= int(i) < len(self.labels)]
        if bad:
            raise DataError(f"label id {bad[0]} is out of range for {len(self.labels)} labels")
        return [self.labels[int(i)] for i in ids]

    def save(self, path: str | Path) -> None:
        """Write {"labels": [...]} as JSON atomically (temp file in the same folder, then rename)."""
        write_json_atomic(path, {"labels": list(self.labels)}, ensure_ascii=False)

    @classmethod
    def load(cls, path: str | Path) -> LabelMap:
        """Read a file written by `save`; DataError if it is missing or malformed."""
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"label map not found: {path}") from None
        except (OSError, ValueError, RecursionError) as error:
            raise DataError(f"{path} is not a valid label map: {str(error)[:200]}") from None
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
            found = f"only one class ({preview(unique)})" if unique else "no labels"
            raise DataError(f"label column '{shown(column)}' has {found}; a classifier needs at least two")
        return cls(_sorted_labels(unique))


@dataclass(frozen=True)
class Datasets:
    """Train and validation tables (an input column and "label": int64 ids) and their label map."""

    train: pa.Table
    validation: pa.Table
    labels: LabelMap


# ---------------------------------------------------------------- columns


def require_columns(raw: pa.Table, path: Path, names: Iterable[str]) -> None:
    """DataError unless each of `names` is exactly one column of `raw` (read from `path`)."""
    for name in names:
        count = raw.column_names.count(name)
        if count == 0:
            columns = ", ".join(shown(c) for c in raw.column_names[:20])
            more = f" (and {raw.num_columns - 20} more)" if raw.num_columns > 20 else ""
            raise DataError(f"column '{shown(name)}' not found in {path}; columns are: {columns}{more}")
        if count > 1:
            raise DataError(f"column '{shown(name)}' appears {count} times in {path}")


def as_string(column: pa.ChunkedArray, path: Path, name: str) -> pa.ChunkedArray:
    """`column` as UTF-8 strings; DataError when its type or bytes cannot be read as text."""
    if pa.types.is_string(column.type):
        return column
    try:
        return pc.cast(column, pa.string())
    except pa.ArrowException:  # a struct or list, or binary that is not UTF-8
        raise DataError(f"{path}: column '{shown(name)}' has type {column.type}, "
                        "which cannot be read as text") from None


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
            raise DataError(f"class {preview([name])} has only {len(rows)} row; a validation split needs "
                            "at least 2 rows per class (or give data.validation_path)")
        size = min(max(1, math.floor(fraction * len(rows) + 0.5)), len(rows) - 1)
        in_validation[rng.choice(rows, size=size, replace=False)] = True
    return table.filter(pa.array(~in_validation)), table.filter(pa.array(in_validation))


def unknown_labels(column: pa.ChunkedArray, labels: LabelMap) -> tuple[pa.Array, list[str]]:
    """(ids of `column`'s values in `labels`, null where unknown; the sorted unknown values)."""
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
    ids, unknown = unknown_labels(column, labels)
    if unknown:
        raise DataError(f"unknown label(s) {preview(unknown)}; known labels: {preview(labels.labels)}")
    return table.set_column(table.column_names.index("label"), "label", pc.cast(ids, pa.int64()))


def build_datasets(
    train: pa.Table, cfg: DataConfig, seed: int, read_validation: Callable[[str], pa.Table]
) -> Datasets:
    """Labeled rows of cfg.path -> label map, validation rows (read from cfg.validation_path by
    `read_validation`, or a seeded stratified split of `train`) -> encoded Datasets.

    >>> build_datasets(read_table(cfg.path), cfg, seed=0, read_validation=read_table)  # doctest: +SKIP
    """
    try:
        labels = LabelMap.from_values(pc.unique(train.column("label")).to_pylist(), column=cfg.label_column)
        if cfg.validation_path is None:
            train, validation = stratified_split(train, cfg.split_fraction, seed)
    except DataError as error:
        raise DataError(f"{cfg.path}: {error}") from None
    if cfg.validation_path is not None:
        validation = read_validation(cfg.validation_path)
        _, unknown = unknown_labels(validation.column("label"), labels)
        if unknown:
            raise DataError(f"{cfg.validation_path} has label(s) not in the training data {cfg.path}: "
                            f"{preview(unknown)}; known labels: {preview(labels.labels)}")
    return Datasets(encode_labels(train, labels), encode_labels(validation, labels), labels)
