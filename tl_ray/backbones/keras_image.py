"""keras.applications image networks (tf_keras, i.e. Keras 2) with a new classification head.

Model: image -> [augmentation] -> base (include_top=False; called with training=False when
BatchNorm is frozen) -> GlobalAveragePooling2D -> Dropout -> Dense(labels) giving logits. Inputs are preprocessed outside the model with the architecture's own
`preprocess_input` (see `preprocess`).

Unfreeze depth counts *units*: layers of the base that own trainable weights and are not
BatchNormalization (Conv2D, DepthwiseConv2D, Dense), from the top. Depth k trains the top k
units plus the head; depth `num_layers()` trains every unit. With `batchnorm: frozen` (the
default for pretrained weights, the Keras fine-tuning guide's recipe) BatchNorm layers never
train and run in inference mode; with `batchnorm: train` (the default from scratch) a
BatchNorm layer trains, on batch statistics, exactly when the unit before it does.
Phase 1 (`head`) trains the head alone; phase 2 (`finetune`) applies the depth. The phases
are an unfreeze schedule (tl_ray/unfreeze.py): the epochs before its first step are the head
phase; `head_epochs: h, unfreeze_depth: d` is the one step `[[h + 1, d]]`.

tf_keras, not Keras 3: under Ray's TensorflowTrainer with MultiWorkerMirroredStrategy,
Keras 3.15 fails in `fit` ("Attempt to convert a value (PerReplica...)"); tf_keras 2.21
trains (checked on this machine, see the issue-6 note). TF_USE_LEGACY_KERAS=1 is set before
TensorFlow is imported so `tf.keras` is the same Keras.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import logging  # noqa: E402
from functools import lru_cache  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402

from tl_ray import unfreeze  # noqa: E402
from tl_ray.backbones.base import Backbone  # noqa: E402
from tl_ray.backbones.registry import register  # noqa: E402
from tl_ray.errors import BackboneError, CheckpointError  # noqa: E402
from tl_ray.images import read_images  # noqa: E402

__all__ = ["ARCHITECTURES", "KerasImageBackbone", "MODEL_FILE", "UNIT_COUNTS", "WEIGHT_SUFFIXES"]

MODEL_FILE = "model.keras"
WEIGHT_SUFFIXES = (".weights.h5", ".h5", ".keras")
# A fixed mapping from the config's name to keras.applications (constructor, module).
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "VGG16": ("VGG16", "vgg16"),
    "ResNet50": ("ResNet50", "resnet50"),
    "MobileNetV2": ("MobileNetV2", "mobilenet_v2"),
    "EfficientNetB0": ("EfficientNetB0", "efficientnet"),
}
# Units per architecture (any alpha or image size); tests check it against built models.
# A table, so the driver validates depths without importing TensorFlow.
UNIT_COUNTS = {"VGG16": 13, "ResNet50": 53, "MobileNetV2": 52, "EfficientNetB0": 81}


# BatchNorm momentum when BatchNorm trains. MobileNetV2 ships 0.999 (tuned for ImageNet's
# step counts): on a few hundred steps its moving statistics would stay near their initial
# values, and inference (validation, serving) would use wrong statistics.
BN_TRAIN_MOMENTUM = 0.9


class _LazyKeras:
    """`keras` here is tf_keras, imported on first use (the driver never needs it)."""

    def __getattr__(self, name: str) -> Any:
        import tf_keras

        return getattr(tf_keras, name)


keras: Any = _LazyKeras()


def _application(architecture: str) -> tuple[Callable[..., Any], Callable[[Any], Any]]:
    constructor, module = ARCHITECTURES[architecture]
    apps = keras.applications
    return getattr(apps, constructor), getattr(apps, module).preprocess_input


def _is_bn(layer: Any) -> bool:
    return isinstance(layer, keras.layers.BatchNormalization)


def _units(base: Any) -> list[Any]:
    """The base's unfreezable layers, bottom to top: weighted layers other than BatchNorm."""
    return [
        layer for layer in base.layers
        if not _is_bn(layer) and any(v.trainable for v in layer.weights)
    ]


@lru_cache(maxsize=None)
def _unit_names(architecture: str, alpha: float) -> tuple[str, ...]:
    """Unit layer names of an architecture (independent of image size and weights)."""
    base = _construct(architecture, alpha, 32, weights=None)
    return tuple(layer.name for layer in _units(base))


def _construct(architecture: str, alpha: float, size: int, weights: str | None) -> Any:
    constructor, _ = _application(architecture)
    extra = {"alpha": alpha} if architecture == "MobileNetV2" else {}
    return constructor(include_top=False, weights=weights, input_shape=(size, size, 3), **extra)


def _variable_names(layers: list[Any], trainable_only: bool) -> set[str]:
    return {
        v.name for layer in layers
        for v in (layer.trainable_weights if trainable_only else layer.weights) if v.trainable
    }


@register("keras-image")
class KerasImageBackbone(Backbone):
    """`backbone: {kind: keras-image, architecture, weights, image_size, unfreeze_depth, ...}`."""

    input_kind = "image"
    framework = "tensorflow"

    # -- config checks ---------------------------------------------------------------------
    def num_layers(self) -> int:
        return UNIT_COUNTS[self.cfg.architecture]

    @property
    def depth(self) -> int:
        """The configured `unfreeze_depth` (phase 2's), checked with the schedule's depths."""
        layers = self.num_layers()
        if self.cfg.unfreeze_depth > layers:
            raise BackboneError(
                f"backbone.unfreeze_depth must be between 0 and {layers} for "
                f"{self.cfg.architecture} ({layers} weighted non-BatchNorm layers), "
                f"got {self.cfg.unfreeze_depth}"
            )
        self.check_schedule(f" for {self.cfg.architecture}")
        return self.cfg.unfreeze_depth

    @property
    def schedule(self) -> Any:
        """The unfreeze schedule: the configured one, else the two phases as one step."""
        if self.cfg.unfreeze_schedule is not None:
            return self.cfg.unfreeze_schedule
        head = 1 if self.cfg.head_epochs is None else self.cfg.head_epochs
        return [[head + 1, self.cfg.unfreeze_depth]]

    def _scheduled(self, epoch: int) -> int | None:
        """The schedule's depth at `epoch`; None in the head phase (before its first step)."""
        return unfreeze.depth_at(self.schedule, epoch, base=self.depth, layers=self.num_layers())

    def depth_at(self, epoch: int) -> int:
        """The depth in force at `epoch`: 0 in the head phase, else the schedule's."""
        depth = self._scheduled(epoch)
        return 0 if depth is None else depth

    def check(self) -> None:
        cfg = self.cfg
        if cfg.alpha != 1.0 and cfg.architecture != "MobileNetV2":
            raise BackboneError(f"backbone.alpha applies to MobileNetV2 only, got alpha={cfg.alpha} "
                                f"for {cfg.architecture}")
        depth = self.depth
        if cfg.weights is None and depth < self.num_layers():
            logging.getLogger("tl_ray.backbones").warning(
                "keras-image with weights: null and unfreeze_depth %d < %d: the frozen, "
                "randomly initialised bottom gives near-zero features; from scratch, train "
                "every layer (unfreeze_depth: %d, head_epochs: 0)",
                depth, self.num_layers(), self.num_layers())
        weights = cfg.weights
        if weights not in (None, "imagenet"):
            path = Path(weights)
            if not path.name.lower().endswith(WEIGHT_SUFFIXES):
                raise BackboneError(f"backbone.weights: expected imagenet, null or a file ending in "
                                    f"{', '.join(WEIGHT_SUFFIXES)}, got {weights!r}")
            if not path.is_file():
                raise BackboneError(f"backbone.weights: file not found: {weights}")

    # -- model -----------------------------------------------------------------------------
    def _base(self) -> Any:
        """The base network with the configured weights."""
        cfg, weights = self.cfg, self.cfg.weights
        self.check()
        if weights == "imagenet":
            try:
                return _construct(cfg.architecture, cfg.alpha, cfg.image_size, "imagenet")
            except Exception as error:  # keras raises a bare Exception for a failed download
                if "URL fetch failure" in str(error) or isinstance(error, OSError):
                    raise BackboneError(
                        f"backbone.weights: imagenet weights for {cfg.architecture} could not be "
                        "downloaded (this machine looks offline); pass a local weights file "
                        f"({', '.join(WEIGHT_SUFFIXES)}) or null"
                    ) from None
                raise BackboneError(f"backbone.weights: imagenet: {str(error).splitlines()[0]}") from None
        base = _construct(cfg.architecture, cfg.alpha, cfg.image_size, None)
        if weights is not None:
            self._load_base_weights(base, Path(weights))
        return base

    def _load_base_weights(self, base: Any, path: Path) -> None:
        what = f"{self.cfg.architecture} (include_top=False, alpha={self.cfg.alpha})"
        try:
            if path.name.lower().endswith(".keras"):
                source = keras.models.load_model(path, compile=False)
                base.set_weights(_matching_weights(source, base))
            else:
                base.load_weights(str(path))
        except (ValueError, OSError, KeyError, TypeError) as error:
            raise BackboneError(
                f"backbone.weights: {path} does not fit {what}: {str(error).splitlines()[0][:200]}"
            ) from None

    def _assemble(self, base: Any, num_labels: int) -> Any:
        size, cfg = self.cfg.image_size, self.cfg
        inputs = keras.Input((size, size, 3), name="image")
        x = inputs
        if cfg.augment:
            x = keras.Sequential(
                [keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.05),
                 keras.layers.RandomZoom(0.1)],
                name="augment",
            )(x)
        # frozen: BatchNorm in inference mode, also once unfrozen; train: it follows fit/predict
        x = base(x) if self.bn_trains else base(x, training=False)
        if self.bn_trains:  # moving statistics that converge in a few hundred steps
            for layer in base.layers:
                if _is_bn(layer):
                    layer.momentum = min(layer.momentum, BN_TRAIN_MOMENTUM)
        x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
        x = keras.layers.Dropout(cfg.head_dropout, name="dropout")(x)
        outputs = keras.layers.Dense(num_labels, name="head")(x)
        return keras.Model(inputs, outputs, name=f"tl_ray_{cfg.architecture.lower()}")

    def build(self, num_labels: int) -> Any:
        """Base (configured weights) plus a new head; starts in the `head` phase."""
        model = self._assemble(self._base(), num_labels)
        self.set_phase(model, "head")
        return model

    @staticmethod
    def base_of(model: Any) -> Any:
        for layer in model.layers:
            if isinstance(layer, keras.Model) and layer.name != "augment":
                return layer
        raise CheckpointError(f"model {model.name} has no base network")

    # -- which layers train ------------------------------------------------------------------
    @property
    def bn_trains(self) -> bool:
        """Whether BatchNorm layers train (see `batchnorm` in KerasImageConfig)."""
        mode = self.cfg.batchnorm
        return mode == "train" or (mode == "auto" and self.cfg.weights is None)

    def set_phase(self, model: Any, phase: str) -> None:
        """`head`: base frozen; `finetune`: the top `unfreeze_depth` units train."""
        self.set_depth(model, 0 if phase == "head" else self.depth)

    def set_depth(self, model: Any, depth: int) -> None:
        """The top `depth` units train (and, with batchnorm train, the BatchNorm layer after
        each of them), and the head; depth 0 freezes the base."""
        base = self.base_of(model)
        base.trainable = depth > 0
        if depth > 0:
            units = _units(base)
            top = {layer.name for layer in units[len(units) - depth:]}
            unit_names, previous_trains = {layer.name for layer in units}, False
            for layer in base.layers:
                if _is_bn(layer):
                    layer.trainable = self.bn_trains and previous_trains
                    continue
                layer.trainable = layer.name in top
                if layer.name in unit_names:
                    previous_trains = layer.trainable
        for layer in model.layers:
            if layer is not base:
                layer.trainable = True

    def apply_unfreeze(self, model: Any, depth: int | None = None) -> None:
        self.set_depth(model, self.depth if depth is None else depth)

    # -- the head phase on cached features (the frozen base's pooled output, computed once) --
    def head_cacheable(self, model: Any) -> bool:
        """Whether head-only epochs may train on cached pooled features: no augmentation, and
        a frozen base that is deterministic (BatchNorm in inference mode, no dropout inside)."""
        if self.cfg.augment:
            return False
        base = self.base_of(model)
        return not self.bn_trains or not any(
            isinstance(layer, keras.layers.Dropout) for layer in base.submodules
        )

    def pooled_features(self, model: Any, pixels: np.ndarray, batch_size: int) -> np.ndarray:
        """The frozen base's globally pooled output for uint8 pixels, in inference mode."""
        base, pool = self.base_of(model), model.get_layer("pool")
        chunks = [
            np.asarray(pool(base(self.preprocess_pixels(pixels[start : start + batch_size]), training=False)))
            for start in range(0, len(pixels), batch_size)
        ]
        width = int(pool.output_shape[-1])
        return np.concatenate(chunks) if chunks else np.zeros((0, width), np.float32)

    def head_model(self, model: Any) -> Any:
        """Dropout + dense over pooled features, sharing `model`'s head layers (and weights)."""
        features = keras.Input(model.get_layer("pool").output_shape[1:], name="features")
        x = model.get_layer("dropout")(features)
        return keras.Model(features, model.get_layer("head")(x), name="head_only")

    def phase_of(self, epoch: int) -> str:
        """Epochs before the schedule's first step (1..head_epochs) train the head; the rest fine-tune."""
        return "head" if self._scheduled(epoch) is None else "finetune"

    def learning_rate(self, phase: str) -> float:
        return self.cfg.head_lr if phase == "head" else self.cfg.finetune_lr

    def layer_of(self, name: str) -> int:
        """0 for the head, 1 for the top unit, ... (by the variable's layer name)."""
        layer = name.split("/")[0]
        names = _unit_names(self.cfg.architecture, self.cfg.alpha)
        return len(names) - names.index(layer) if layer in names else 0

    def trainable_names(self, model: Any) -> set[str]:
        return {v.name for v in model.trainable_weights}

    def parameter_names(self, model: Any) -> set[str]:
        """Every weight full-depth fine-tuning trains: all but BatchNorm's when it is frozen."""
        base = self.base_of(model)
        head = [layer for layer in model.layers if layer is not base]
        norms = [layer for layer in base.layers if _is_bn(layer)] if self.bn_trains else []
        return _variable_names([*_units(base), *norms, *head], trainable_only=False)

    # -- data and persistence ------------------------------------------------------------------
    def preprocess_pixels(self, pixels: Any) -> Any:
        """uint8 (n, S, S, 3) pixels (NumPy or tf) -> the architecture's float inputs."""
        _, preprocess_input = _application(self.cfg.architecture)
        if isinstance(pixels, np.ndarray):
            return preprocess_input(pixels.astype(np.float32))  # a copy: it works in place
        import tensorflow as tf

        return preprocess_input(tf.cast(pixels, tf.float32))

    def preprocess(self, images: list[Any], max_length: int | None = None) -> np.ndarray:
        """Encoded bytes, paths or arrays -> resized, preprocessed float32 (n, S, S, 3).

        `max_length` is the text families' argument and is ignored here.
        """
        return self.preprocess_pixels(read_images(list(images), self.cfg.image_size))

    def logits(self, model: Any, inputs: Any) -> Any:
        return model(inputs, training=False)

    def scores(self, model: Any, inputs: Any) -> np.ndarray:
        return np.asarray(self.logits(model, inputs), dtype=np.float32)

    def save(self, model: Any, folder: Path) -> None:
        """The whole model as `model.keras` (loadable by plain tf_keras, no tl-ray code)."""
        model.save(str(Path(folder) / MODEL_FILE))

    def load(self, folder: Path, num_labels: int, trainable: bool = False) -> Any:
        path = Path(folder) / MODEL_FILE
        if not path.is_file():
            raise CheckpointError(f"{folder} has no {MODEL_FILE}")
        try:
            model = keras.models.load_model(str(path), compile=False)
        except (ValueError, OSError) as error:
            raise CheckpointError(f"{path}: cannot load ({str(error).splitlines()[0][:200]})") from None
        outputs = model.outputs[0].shape[-1]
        if outputs != num_labels:
            raise CheckpointError(f"{path} has {outputs} outputs but labels.json lists {num_labels}")
        return model


def _matching_weights(source: Any, base: Any) -> list[np.ndarray]:
    """Weights for `base` from a loaded .keras model: the model itself or a nested base."""
    shapes = [tuple(w.shape) for w in base.weights]
    candidates = [source] + [layer for layer in source.layers if isinstance(layer, keras.Model)]
    for candidate in candidates:
        if [tuple(w.shape) for w in candidate.weights] == shapes:
            return candidate.get_weights()
    raise ValueError(f"no network inside {source.name} has the base's {len(shapes)} weight shapes")
