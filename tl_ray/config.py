"""Typed run configuration, validated once at the boundary.

Example:
    >>> cfg = load_config("examples/minilm-sentiment.yaml", overrides=["train.epochs=1"])
    >>> cfg.backbone.kind
    'hf-text'
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from tl_ray import unfreeze
from tl_ray.errors import ConfigError, brief, first_line, shown

__all__ = [
    "BackboneConfig",
    "DataConfig",
    "HFTextConfig",
    "KerasImageConfig",
    "RunConfig",
    "SearchConfig",
    "TrainConfig",
    "WordVectorsConfig",
    "apply_overrides",
    "load_config",
    "parse_backbone",
    "parse_config",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# `[[epoch, depth], ...]` or `{gradual: {start, every, step}}`, normalised (see tl_ray/unfreeze.py)
UnfreezeSchedule = Annotated[Any, BeforeValidator(unfreeze.parse_schedule)]


class DataConfig(_Strict):
    """Where the labeled examples are and how to read them."""

    path: str
    text_column: str = "text"
    label_column: str = "label"
    validation_split: float | None = Field(default=None, gt=0.0, lt=1.0)
    validation_path: str | None = None
    encoding: str = "utf-8"
    empty_text: Literal["skip", "error"] = "skip"
    # Images (see tl_ray/images.py): a `path` folder of class sub-folders is read as images;
    # a table is read as images when `image_column` names its column of image bytes or paths.
    image_column: str | None = None

    @model_validator(mode="after")
    def _one_validation_source(self) -> "DataConfig":
        if self.validation_path is not None and self.validation_split is not None:
            raise ValueError("give data.validation_split or data.validation_path, not both")
        return self

    @property
    def split_fraction(self) -> float | None:
        """The held-out fraction to split off: 0.1 unless a validation file is given."""
        if self.validation_path is not None:
            return None
        return 0.1 if self.validation_split is None else self.validation_split


class HFTextConfig(_Strict):
    """A Hugging Face transformer encoder with a new classification head.

    `unfreeze_depth` k trains the top k encoder layers (plus pooler and head); 0 trains only
    the head; None or the layer count trains everything, embeddings included. `pooling`
    `auto` picks masked mean for sentence-transformers folders and the [CLS] pooler otherwise.
    `unfreeze_schedule` changes the depth during training (tl_ray/unfreeze.py); before its
    first step the depth is `unfreeze_depth`, or 0 when that is None.
    """

    kind: Literal["hf-text"] = "hf-text"
    name_or_path: str = "minilm"
    unfreeze_depth: int | None = Field(default=None, ge=0)
    unfreeze_schedule: UnfreezeSchedule = None
    mode: Literal["finetune", "lora"] = "finetune"
    lr_decay: float = Field(default=1.0, gt=0.0, le=1.0)
    pooling: Literal["auto", "cls", "mean"] = "auto"
    head_dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    lora_rank: int = Field(default=8, ge=1)
    lora_alpha: int = Field(default=16, ge=1)
    lora_dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    lora_target_modules: list[str] | None = None

    @field_validator("name_or_path")
    @classmethod
    def _absolute_folder(cls, value: str) -> str:
        """A local model folder is made absolute here, on the driver: workers run elsewhere."""
        folder = Path(os.path.expanduser(value))  # Path.expanduser raises for ~nosuchuser
        return str(folder.resolve()) if folder.is_dir() else value

    @model_validator(mode="after")
    def _schedule_fits(self) -> "HFTextConfig":
        if self.unfreeze_schedule is not None and self.mode == "lora":
            raise ValueError("backbone.unfreeze_schedule needs mode: finetune (LoRA adapters are "
                             "placed in the top layers once, when the model is built)")
        unfreeze.check_base(self.unfreeze_schedule, self.unfreeze_depth)
        return self


class KerasImageConfig(_Strict):
    """A `keras.applications` image network (tf_keras) with a new pooling-dropout-dense head.

    Two phases: for the first `head_epochs` (default 1) of `train.epochs` the base is frozen
    and the head trains at `head_lr`; the remaining epochs unfreeze the top `unfreeze_depth`
    weighted non-BatchNorm layers of the base (BatchNorm stays frozen, in inference mode) at
    `finetune_lr`: the one-step `unfreeze_schedule: [[head_epochs + 1, unfreeze_depth]]`.
    With a schedule (not both), the epochs before its first step are the head phase. `weights`: `imagenet` (needs network), a local `.weights.h5`/`.h5`/`.keras`
    file of the base network, or null (random init). `batchnorm`: `frozen` keeps BatchNorm
    in inference mode and untrained (the fine-tuning recipe), `train` lets a BatchNorm layer
    train (batch statistics) with the layer before it; `auto` is frozen with pretrained
    weights and train with null (from scratch, frozen statistics would never normalise).
    """

    kind: Literal["keras-image"] = "keras-image"
    architecture: Literal["VGG16", "ResNet50", "MobileNetV2", "EfficientNetB0"] = "MobileNetV2"
    weights: str | None = None
    image_size: int = Field(default=224, ge=32, le=1024)
    alpha: float = Field(default=1.0, gt=0.0, le=1.4)  # MobileNetV2 width multiplier only
    unfreeze_depth: int = Field(default=0, ge=0)
    unfreeze_schedule: UnfreezeSchedule = None
    head_epochs: int | None = Field(default=None, ge=0)  # None: 1, or the schedule's first step
    head_lr: float = Field(default=1e-3, gt=0.0)
    finetune_lr: float = Field(default=1e-5, gt=0.0)
    head_dropout: float = Field(default=0.2, ge=0.0, lt=1.0)
    augment: bool = False
    batchnorm: Literal["auto", "frozen", "train"] = "auto"

    @field_validator("weights")
    @classmethod
    def _absolute_weights(cls, value: str | None) -> str | None:
        """A weights file path is made absolute here, on the driver: workers run elsewhere."""
        if value is None or value == "imagenet":
            return value
        return os.path.abspath(os.path.expanduser(value))

    @model_validator(mode="after")
    def _one_schedule(self) -> "KerasImageConfig":
        if self.unfreeze_schedule is not None and self.head_epochs is not None:
            raise ValueError("give backbone.head_epochs or backbone.unfreeze_schedule, not both: "
                             "the epochs before the schedule's first step are the head phase")
        return self


class WordVectorsConfig(_Strict):
    """Pretrained word vectors (word2vec/GloVe/fastText via gensim), an encoder and a head.

    `unfreeze_depth` 0 freezes the embedding, 1 (or None) trains it; the encoder and head
    always train. `oov`: `subword` (fastText n-grams), `learned` (one trained vector),
    `zero`, or `auto` (subword when the vectors have n-grams, else learned). `init: random`
    keeps the vocabulary but draws new vectors (Kim 2014's CNN-rand baseline).
    `unfreeze_schedule` (e.g. `[[3, 1]]` with `unfreeze_depth: 0`) unfreezes it mid-run.
    """

    kind: Literal["word-vectors"] = "word-vectors"
    vectors: str
    unfreeze_depth: int | None = Field(default=1, ge=0)
    unfreeze_schedule: UnfreezeSchedule = None
    encoder: Literal["mean", "cnn", "bilstm"] = "cnn"
    oov: Literal["auto", "subword", "learned", "zero"] = "auto"
    init: Literal["pretrained", "random"] = "pretrained"
    max_vocab: int | None = Field(default=None, ge=1)
    dropout: float = Field(default=0.5, ge=0.0, lt=1.0)
    cnn_filters: list[int] = Field(default_factory=lambda: [3, 4, 5], min_length=1)
    cnn_maps: int = Field(default=100, ge=1)
    lstm_hidden: int = Field(default=100, ge=1)
    lr_decay: float = Field(default=1.0, gt=0.0, le=1.0)  # embedding lr = lr * lr_decay

    @field_validator("vectors")
    @classmethod
    def _absolute(cls, value: str) -> str:  # workers may run elsewhere than the driver's cwd
        return value if "://" in value else os.path.abspath(os.path.expanduser(value))

    @field_validator("cnn_filters")
    @classmethod
    def _widths(cls, value: list[int]) -> list[int]:
        if any(width < 1 for width in value):
            raise ValueError(f"filter widths must be >= 1, got {value}")
        return value

    @model_validator(mode="after")
    def _schedule_fits(self) -> "WordVectorsConfig":
        unfreeze.check_base(self.unfreeze_schedule, self.unfreeze_depth)
        return self


DEFAULT_KIND = "hf-text"
BackboneConfig = Annotated[
    Union[HFTextConfig, KerasImageConfig, WordVectorsConfig], Field(discriminator="kind")
]


class TrainConfig(_Strict):
    """Optimisation and scaling settings of one training run."""

    lr: float = Field(default=5e-5, gt=0.0)
    # The classification head's own rate (its own AdamW group); None: the head trains at `lr`.
    head_lr: float | None = Field(default=None, gt=0.0)
    weight_decay: float = Field(default=0.01, ge=0.0)
    # Learning-rate curve over all steps (tl_ray/train/step.py); warmup_ratio is its peak.
    schedule: Literal["linear", "slanted_triangular", "cosine"] = "linear"
    warmup_ratio: float = Field(default=0.1, ge=0.0, lt=1.0)
    grad_clip: float | None = Field(default=1.0, gt=0.0)
    epochs: int = Field(default=3, ge=1)
    batch_size: int = Field(default=32, ge=1)
    max_length: int = Field(default=128, ge=8)
    num_workers: int = Field(default=1, ge=1)
    cpus_per_worker: float = Field(default=1.0, gt=0.0)
    use_gpu: bool = False
    seed: int = 0
    metric: Literal["val_accuracy", "val_f1", "val_loss"] = "val_accuracy"
    keep_checkpoints: int = Field(default=1, ge=1)
    max_failures: int = Field(default=2, ge=0)
    # Frozen-prefix cache: compute the frozen bottom's output once, reuse it every epoch.
    cache: bool = True
    cache_max_mb: float = Field(default=4096, gt=0)

    @property
    def metric_mode(self) -> str:
        return "min" if self.metric == "val_loss" else "max"


class SearchConfig(_Strict):
    """How `tl-ray tune` searches: Optuna sampler, ASHA early stopping, concurrency, storage."""

    trials: int = Field(default=8, ge=1)
    sampler: Literal["tpe", "random", "cmaes", "gp"] = "tpe"
    seed: int = 0
    early_stopping: bool = True
    grace_period: int = Field(default=1, ge=1)
    reduction_factor: int = Field(default=2, ge=2)
    max_concurrent_trials: int | None = Field(default=None, ge=1)
    # k >= 2: each trial trains k models on stratified folds of the labeled rows (training and
    # validation pooled) and scores their mean (tl_ray/search/folds.py): k times the cost.
    cv_folds: int | None = Field(default=None, ge=2)
    storage: str | None = None  # SQLAlchemy URL; default: sqlite file in the output folder
    # How a trial trains: "in-process" runs the one-worker loop in the Tune trial's own process
    # (no Train run to start per trial); "ray-train" gives every trial its own Ray Train run
    # (TorchTrainer / TensorflowTrainer); "auto" is in-process when train.num_workers is 1.
    trial_runner: Literal["auto", "in-process", "ray-train"] = "auto"
    # MLflow tracking URI (e.g. sqlite:///mlflow.db or http://mlflow:5000): one MLflow run per
    # trial, its parameters and per-epoch metrics. Default off (TensorBoard files are always
    # written under OUTPUT/tensorboard). Needs the `tracking` extra.
    mlflow_uri: str | None = None
    mlflow_experiment: str | None = None  # default: the output folder's name


class RunConfig(_Strict):
    """A whole training run: data, backbone, optimisation, and where results go."""

    data: DataConfig
    backbone: BackboneConfig = Field(default_factory=HFTextConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    output: str = "runs/latest"
    # Ray Train/Tune checkpoint storage: a path every node sees (NFS) or an s3:// / gs:// URI.
    storage_path: str | None = None  # default: output

    @model_validator(mode="before")
    @classmethod
    def _default_kind(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and isinstance(raw.get("backbone"), dict):
            raw = {**raw, "backbone": {"kind": DEFAULT_KIND, **raw["backbone"]}}
        return raw

    @model_validator(mode="after")
    def _phases_fit(self) -> "RunConfig":
        head = getattr(self.backbone, "head_epochs", None)
        if head is not None and head > self.train.epochs:
            raise ValueError(
                f"backbone.head_epochs ({head}) must be <= train.epochs ({self.train.epochs}); "
                "phase 2 (fine-tuning) runs for the remaining epochs"
            )
        unfreeze.check_epochs(self.backbone.unfreeze_schedule, self.train.epochs)
        if self.backbone.kind == "keras-image":
            if self.train.head_lr is not None:
                raise ValueError("train.head_lr applies to the torch backbones; keras-image sets "
                                 "backbone.head_lr (its head phase) and backbone.finetune_lr")
            if self.train.schedule != "linear":
                raise ValueError(f"train.schedule {self.train.schedule} applies to the torch "
                                 "backbones; keras-image trains at backbone.head_lr, then finetune_lr")
        return self


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    where = shown(where)
    if first["type"] == "extra_forbidden":
        return f"unknown key '{where}'; check its spelling against the README's config reference"
    if first["type"] == "missing":
        return f"missing required key '{where}'"
    value = first.get("input")
    got = "" if isinstance(value, dict) else f" (got {brief(value)})"
    return f"{where}: {first_line(first['msg'])}{got}"


def parse_config(raw: dict[str, Any]) -> RunConfig:
    """Validate a plain dict (e.g. parsed YAML or `model_dump()`) into a RunConfig."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None


def parse_backbone(raw: dict[str, Any]) -> Any:
    """Validate a backbone section alone (as stored in a checkpoint manifest)."""
    try:
        return TypeAdapter(BackboneConfig).validate_python({"kind": DEFAULT_KIND, **raw})
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None


def parse_yaml(text: str) -> Any:
    """yaml.safe_load, where every way YAML text can fail is a yaml.YAMLError: PyYAML lets an
    integer past Python's digit limit out as ValueError and deep nesting as RecursionError.

    >>> parse_yaml("a: [1, 2]")
    {'a': [1, 2]}
    """
    try:
        return yaml.safe_load(text)
    except (ValueError, RecursionError) as error:
        raise yaml.YAMLError(first_line(str(error), 120)) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` overrides (values parsed as YAML) to a nested dict copy.

    >>> apply_overrides({"train": {"lr": 1e-4}}, ["train.lr=3e-5", "train.epochs=2"])
    {'train': {'lr': 3e-05, 'epochs': 2}}
    """
    result = yaml.safe_load(yaml.safe_dump(raw)) or {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key.path=value, got {brief(item)}")
        parts = key.strip().split(".")
        node = result
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {brief(key.strip())}: {brief(part)} is a value, not a section")
            node = child
        try:
            node[parts[-1]] = parse_yaml(text) if text.strip() else None
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {brief(key.strip())}: the value {brief(text)} is not valid YAML "
                              f"({first_line(str(error), 120)}); quote it if it is a string") from None
    return result


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config file, apply `--set` overrides, and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path} is not valid YAML: {first_line(str(error))}") from None
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror or error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping with data/backbone/train/output keys")
    return parse_config(apply_overrides(raw, overrides or []))
