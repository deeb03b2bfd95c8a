"""Small real image data for the keras-image tests: scikit-learn's bundled 8x8 digits."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np


def digits(classes: tuple[int, ...], per_class: int, seed: int = 0) -> list[tuple[np.ndarray, str]]:
    """`per_class` digits of each class as 8x8 uint8 grey images (0..255) with their label."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    rng = np.random.default_rng(seed)
    rows = []
    for label in classes:
        index = rng.permutation(np.flatnonzero(bunch.target == label))[:per_class]
        rows += [((bunch.images[i] * 255 / 16).astype(np.uint8), str(label)) for i in index]
    return rows


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_image_folder(root: Path, rows: list[tuple[np.ndarray, str]]) -> Path:
    """root/<label>/<i>.png for every row."""
    for i, (pixels, label) in enumerate(rows):
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / label / f"{i:04d}.png").write_bytes(png_bytes(pixels))
    return root
