"""Labeled images from a folder of class sub-folders or a table; pure Pillow + pyarrow, no Ray.

Tables hold the encoded image files (PNG/JPEG bytes), so they stay small and serving reads the
same bytes; `decode_image` turns them into fixed-size RGB pixels where the model needs them.

Folder layout::

    flowers/daisy/001.jpg
    flowers/tulip/a.png      -> labels ('daisy', 'tulip')

Example:
    >>> ds = load_image_datasets(DataConfig(path="flowers"), seed=0)   # doctest: +SKIP
    >>> ds.train.column_names, ds.labels.labels                        # doctest: +SKIP
    (['image', 'label'], ('daisy', 'tulip'))
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tl_ray.errors import DataError
from tl_ray.labels import Datasets, as_string, build_datasets, preview, require_columns, shown

if TYPE_CHECKING:
    from tl_ray.config import DataConfig

__all__ = ["IMAGE_SUFFIXES", "decode_image", "load_image_datasets", "read_image_folder",
           "read_image_table", "read_images"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_TABLE_SUFFIXES = (".parquet", ".csv")


def decode_image(data: bytes | np.ndarray | str | Path, size: int, name: str = "image") -> np.ndarray:
    """Encoded bytes, a file path or an HxWx{1,3,4} array -> (size, size, 3) uint8 RGB.

    >>> decode_image(np.zeros((8, 8), np.uint8), 32).shape
    (32, 32, 3)
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(data, (str, Path)):
        name, data = str(data), _read_file(Path(data))
    if isinstance(data, np.ndarray):
        array = data if data.ndim == 3 else data[..., None]
        if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
            raise DataError(f"{name}: expected an HxW or HxWx{{1,3,4}} array, got shape {data.shape}")
        pixels = np.clip(array, 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    else:
        try:
            image = Image.open(io.BytesIO(bytes(data)))
            image.load()
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
            detail = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise DataError(f"{name}: cannot decode image ({detail}); expected PNG or JPEG") from None
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def read_images(items: list[Any], size: int) -> np.ndarray:
    """A batch of images (bytes, paths or arrays) -> (n, size, size, 3) uint8."""
    if not items:
        return np.zeros((0, size, size, 3), np.uint8)
    return np.stack([decode_image(item, size, name=f"image {i}") for i, item in enumerate(items)])


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or type(error).__name__})") from None
    except ValueError:  # a NUL byte in the name
        raise DataError(f"image file name '{shown(path)}' is not a valid path") from None


def _check_decodes(data: bytes, name: str) -> None:
    """Decode once on the driver so a bad file fails the run before any worker starts."""
    decode_image(data, 32, name)


def read_image_folder(folder: str | Path) -> pa.Table:
    """Every image in FOLDER/<class>/ -> ("image": binary, "label": string), sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    images, labels = [], []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for file in sorted(class_dir.rglob("*")):
            if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                data = _read_file(file)
                _check_decodes(data, str(file))
                images.append(data)
                labels.append(class_dir.name)
    if not images:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in class sub-folders; "
                        f"expected {folder}/<class>/<image>")
    return pa.table({"image": pa.array(images, pa.binary()), "label": pa.array(labels, pa.string())})


def _read_raw_table(path: Path) -> pa.Table:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        if path.suffix.lower() == ".parquet":
            return pq.read_table(path)
        return pacsv.read_csv(path)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: cannot read the table ({str(error).splitlines()[0][:200]})") from None


def read_image_table(path: str | Path, image_column: str, label_column: str = "label") -> pa.Table:
    """A .parquet/.csv table whose `image_column` holds image bytes or file paths (relative
    paths are taken from the table's folder) -> ("image": binary, "label": string)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if path.suffix.lower() not in _TABLE_SUFFIXES:
        raise DataError(f"unsupported image table type '{path.suffix}' for {path}; use a folder of "
                        f"class sub-folders or one of {', '.join(_TABLE_SUFFIXES)}")
    raw = _read_raw_table(path)
    require_columns(raw, path, (image_column, label_column))
    column = raw.column(image_column)
    images: list[bytes] = []
    for row, value in enumerate(column.to_pylist(), 1):
        if value is None or value == "" or value == b"":
            raise DataError(f"{path}: row {row} has no image in column '{shown(image_column)}'")
        if isinstance(value, str):
            file = Path(os.path.expanduser(value))  # Path.expanduser raises for ~nosuchuser
            file = file if file.is_absolute() else path.parent / file
            value, name = _read_file(file), str(file)
        elif isinstance(value, bytes):
            name = f"{path} row {row}"
        else:
            raise DataError(f"{path}: row {row} of column '{shown(image_column)}' holds "
                            f"{type(value).__name__} {shown(value)}; expected image bytes or a file path")
        _check_decodes(value, name)
        images.append(bytes(value))
    labels = pc.utf8_trim_whitespace(as_string(raw.column(label_column), path, label_column))
    if labels.null_count:
        raise DataError(f"{path}: {labels.null_count} rows have no label in column '{label_column}'")
    if not images:
        raise DataError(f"{path} has no data rows")
    return pa.table({"image": pa.array(images, pa.binary()), "label": labels})


def _read(path: str, cfg: DataConfig) -> pa.Table:
    if not Path(path).exists():
        raise DataError(f"image folder or table not found: {path}")
    if Path(path).is_dir():
        return read_image_folder(path)
    if cfg.image_column is None:
        raise DataError(f"{path} is not a folder of class sub-folders; for a table of images "
                        "set data.image_column to its column of image bytes or paths")
    return read_image_table(path, cfg.image_column, cfg.label_column)


def load_image_datasets(cfg: DataConfig, seed: int = 0) -> Datasets:
    """Read images from cfg.path (folder or table), build the label map, take validation from
    cfg.validation_path or a seeded stratified split. Tables: "image" (bytes), "label" (id)."""
    train = _read(cfg.path, cfg)
    classes = pc.unique(train.column("label")).to_pylist()
    if len(classes) < 2 and Path(cfg.path).is_dir():  # the folder-specific form of the check
        raise DataError(f"{cfg.path}: only one class sub-folder with images ({preview(classes)}); "
                        "a classifier needs at least two")
    return build_datasets(train, cfg, seed, read_validation=lambda path: _read(path, cfg))
