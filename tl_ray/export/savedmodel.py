"""Export a keras-image model folder as a TensorFlow SavedModel (TF Serving, `tf.saved_model.load`).

Signatures:
- `serving_default`: `pixels`, uint8 RGB `[batch, S, S, 3]` (S: the model's `image_size`,
  resized by the client) -> `logits` float32 `[batch, labels]`. The architecture's
  `preprocess_input` runs inside the graph, so TF Serving clients send raw pixels, as tl-ray's
  `Predictor` would after decoding and resizing (PIL bilinear) an image.
- `preprocessed`: `images`, float32 `[batch, S, S, 3]` already through `preprocess_input`
  -> `logits`.

Class names are in `labels.json` beside `saved_model.pb` and in the loaded object's `labels`
variable. The export is loaded back and checked against the Keras model (1e-4) before it is
published. For TF Serving, export into a numbered version folder (`--out models/digits/1`).

Example:
    >>> export_savedmodel("runs/digits/model", "models/digits/1")  # doctest: +SKIP
    PosixPath('/.../models/digits/1')
    >>> served = tf.saved_model.load("models/digits/1")              # doctest: +SKIP
    >>> served.signatures["serving_default"](pixels=uint8_batch)["logits"]  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tl_ray.errors import CheckpointError
from tl_ray.export.formats import publish

__all__ = ["PIXELS_SIGNATURE", "PREPROCESSED_SIGNATURE", "TOLERANCE", "export_savedmodel",
           "write_savedmodel"]  # fmt: skip

PIXELS_SIGNATURE = "serving_default"
PREPROCESSED_SIGNATURE = "preprocessed"
TOLERANCE = 1e-4  # max |logit difference| to Keras, relative to the largest logit (at least 1)


def export_savedmodel(model_folder: str | Path, out_dir: str | Path, *, force: bool = False) -> Path:
    """Write the SavedModel of keras-image checkpoint `model_folder` to `out_dir`."""
    return publish(model_folder, out_dir, "savedmodel", write_savedmodel, force=force)


def write_savedmodel(source: Path, folder: Path) -> Path:
    """Create `folder` (new) with the SavedModel of `source`, checked against Keras."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before TensorFlow loads (as keras_image)
    import tensorflow as tf

    from tl_ray.train.checkpoint import LABELS_FILE, load_model_folder

    backbone, model, labels, _ = load_model_folder(source)
    module = _serving_module(backbone, model, labels.labels)
    signatures = {
        PIXELS_SIGNATURE: module.pixels.get_concrete_function(),
        PREPROCESSED_SIGNATURE: module.preprocessed.get_concrete_function(),
    }
    tf.saved_model.save(module, str(folder), signatures=signatures)
    labels.save(folder / LABELS_FILE)
    _check_matches(folder, backbone, model, source)
    return folder


def _serving_module(backbone: Any, model: Any, labels: list[str]) -> Any:
    """A tf.Module holding the Keras model, its labels and the two serving functions."""
    import tensorflow as tf

    size = int(backbone.cfg.image_size)
    module = tf.Module()
    module.model = model
    module.labels = tf.Variable(labels, trainable=False, name="labels")

    def from_preprocessed(images: Any) -> dict[str, Any]:
        return {"logits": tf.cast(model(images, training=False), tf.float32)}

    def from_pixels(pixels: Any) -> dict[str, Any]:
        return from_preprocessed(backbone.preprocess_pixels(pixels))

    module.pixels = tf.function(from_pixels, input_signature=[
        tf.TensorSpec([None, size, size, 3], tf.uint8, name="pixels")])  # fmt: skip
    module.preprocessed = tf.function(from_preprocessed, input_signature=[
        tf.TensorSpec([None, size, size, 3], tf.float32, name="images")])  # fmt: skip
    return module


def _check_matches(folder: Path, backbone: Any, model: Any, source: Path) -> None:
    """The SavedModel's raw-pixel signature must give the Keras model's logits."""
    import numpy as np
    import tensorflow as tf

    size = int(backbone.cfg.image_size)
    pixels = np.random.default_rng(0).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    expected = backbone.scores(model, backbone.preprocess_pixels(pixels))
    served = tf.saved_model.load(str(folder)).signatures[PIXELS_SIGNATURE]
    got = served(pixels=tf.constant(pixels))["logits"].numpy()
    worst = float(np.abs(got - expected).max())
    if worst > TOLERANCE * max(1.0, float(np.abs(expected).max())):
        raise CheckpointError(f"the SavedModel export of {source} does not match Keras: max "
                              f"|logit difference| {worst:.2e} > {TOLERANCE:g}")  # fmt: skip
