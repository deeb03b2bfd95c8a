"""The per-worker loop for Keras image backbones, run by Ray's TensorflowTrainer.

Setup (MultiWorkerMirroredStrategy across the workers), data, model, then the unfreeze
schedule (`KerasImageBackbone.schedule`): the epochs before its first step (1..head_epochs)
train the head on a frozen base at `head_lr`; from the first step on, the top units of the
depth in force train at `finetune_lr`. Each change of depth (or phase) recompiles with a
fresh Adam over the weights that train then, as in the Keras fine-tuning guide. Reported
metrics match the torch loop's, `unfreeze_depth` included.

Data: each worker materialises its (equal-sized) Ray Data shard of the training set once,
decoded and resized to uint8 pixels, and reshuffles it every epoch with tf.data
(`train.batch_size` images per worker and step, as in the torch loop). Validation is exact:
every worker decodes the whole validation set, scores every W-th batch with a plain copy of
the weights, and the confusion counts are summed across workers.

Resuming (after a worker failure) restores the weights and the epoch from the last reported
checkpoint; Adam's moments restart.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before TensorFlow loads (see keras_image)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import logging  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from tl_ray.backbones.registry import get_backbone  # noqa: E402
from tl_ray.config import parse_config  # noqa: E402
from tl_ray.data import LabelMap  # noqa: E402
from tl_ray.errors import ConfigError  # noqa: E402
from tl_ray.images import read_images  # noqa: E402
from tl_ray.train.checkpoint import read_manifest  # noqa: E402
from tl_ray.train.session import TrainSession, report_epoch  # noqa: E402

__all__ = ["keras_train_loop_per_worker", "run_keras_loop"]

log = logging.getLogger("tl_ray.train")


def keras_train_loop_per_worker(config: dict[str, Any]) -> None:
    """Fine-tune a keras-image backbone; `config` as for the torch loop (run, labels, train_rows)."""
    run_keras_loop(config, TrainSession())


def run_keras_loop(config: dict[str, Any], session: Any) -> None:
    """The loop itself, in `session` (a TrainSession, or a TrialSession: one worker, no TF_CONFIG)."""
    import tensorflow as tf
    import tf_keras as keras

    # -- setup (the strategy first: it reads TF_CONFIG, set by Ray, before any TF op) --------
    # A trial in its own process is one worker with no TF_CONFIG, and may train several
    # trials in turn (a reused actor): TensorFlow's default strategy, no collectives.
    strategy = tf.distribute.MultiWorkerMirroredStrategy() if session.distributed else tf.distribute.get_strategy()
    cfg = parse_config(config["run"])
    tcfg = cfg.train
    labels = LabelMap(tuple(config["labels"]))
    world = session.world
    keras.utils.set_random_seed(tcfg.seed)
    backbone = get_backbone(cfg.backbone)

    # -- data -------------------------------------------------------------------------------
    size = cfg.backbone.image_size
    x_train, y_train = _materialize(session.shard("train"), size)
    x_val, y_val = _materialize(session.shard("validation"), size)
    if len(x_train) == 0:
        raise ConfigError(f"train.num_workers ({world}) is larger than the training set "
                          f"({config['train_rows']} images); lower train.num_workers")

    # -- model (fresh, or resumed from the last reported checkpoint) ------------------------
    checkpoint = session.checkpoint()
    first_epoch = 1
    with strategy.scope():
        if checkpoint is None:
            model = backbone.build(num_labels=len(labels))
        else:
            with checkpoint.as_directory() as folder:
                model = backbone.load(Path(folder), num_labels=len(labels), trainable=True)
                resumed = read_manifest(folder)
                first_epoch = int(resumed["epoch"]) + 1
    plain = keras.models.clone_model(model)  # outside the scope: evaluation and saving need no collectives

    def report(metrics: dict[str, Any], epoch: int) -> None:  # `plain` holds the model's weights
        report_epoch(session, metrics, backbone=backbone, model=plain, labels=labels, epoch=epoch, cfg=cfg,
                     extra={"image_size": cfg.backbone.image_size, "input": "image"})  # the plain copy

    if checkpoint is not None:  # the epoch resumed from, once more: see loop.py
        plain.set_weights(model.get_weights())  # every worker, same point: a collective read
        report({**resumed["metrics"], "resumed_from_epoch": first_epoch - 1}, first_epoch - 1)

    # -- loop -------------------------------------------------------------------------------
    stage, fit_model, features = None, model, None
    for epoch in range(first_epoch, tcfg.epochs + 1):
        started = time.perf_counter()
        if (backbone.phase_of(epoch), backbone.depth_at(epoch)) != stage:  # a schedule step
            phase, depth = backbone.phase_of(epoch), backbone.depth_at(epoch)
            stage = (phase, depth)
            backbone.set_depth(model, depth)
            fit_model = model
            if phase == "head" and tcfg.cache and backbone.head_cacheable(model):
                # The frozen base gives the same output every epoch: compute it once.
                plain.set_weights(model.get_weights())
                features = _head_features(backbone, plain, x_train, tcfg)
            with strategy.scope():
                if features is not None and phase == "head":
                    fit_model = backbone.head_model(model)  # built in scope, like the model
                fit_model.compile(
                    optimizer=keras.optimizers.Adam(backbone.learning_rate(phase)),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                )
        if fit_model is model:
            data = _epoch_data(tf, strategy, x_train, y_train, backbone.preprocess_pixels,
                               tcfg.batch_size, tcfg.seed + epoch)  # fmt: skip
        else:
            data = _epoch_data(tf, strategy, features, y_train, None, tcfg.batch_size, tcfg.seed + epoch)
        steps = math.ceil(len(x_train) / tcfg.batch_size)  # equal on every worker: equal shards
        history = fit_model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0)
        elapsed = time.perf_counter() - started

        plain.set_weights(model.get_weights())  # every worker, same point: a collective read
        metrics = _evaluate(tf, strategy, session, plain, backbone, x_val, y_val, len(labels), tcfg.batch_size)
        metrics.update(
            epoch=epoch,
            phase=1 if phase == "head" else 2,
            train_loss=float(history.history["loss"][-1]),
            samples_per_s=float(config["train_rows"] / elapsed),
            epoch_s=time.perf_counter() - started,  # training (with any feature caching) + validation
            lr=backbone.learning_rate(phase),
            unfreeze_depth=depth,
            resumed_from_epoch=first_epoch - 1,
            worker_pid=os.getpid(),
        )
        report(metrics, epoch)


def _materialize(shard: Any, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A Ray Data shard of ("image": bytes, "label": id) -> uint8 pixels and int64 labels."""
    pixels, targets = [], []
    for batch in shard.iter_batches(batch_size=256, batch_format="numpy"):
        if "image" not in batch:
            raise ConfigError(
                "backbone kind keras-image needs image data: set data.path to a folder of class "
                "sub-folders, or data.image_column to the table's column of image bytes or paths"
            )
        pixels.append(read_images(list(batch["image"]), size))
        targets.append(np.asarray(batch["label"], dtype=np.int64))
    if not pixels:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros(0, np.int64)
    return np.concatenate(pixels), np.concatenate(targets)


def _head_features(backbone: Any, plain: Any, x: np.ndarray, tcfg: Any) -> np.ndarray | None:
    """Pooled base features of this worker's shard, or None when over `train.cache_max_mb`."""
    width = int(plain.get_layer("pool").output_shape[-1])
    size_mb = len(x) * width * 4 / 2**20
    if size_mb > tcfg.cache_max_mb:
        log.warning("head-phase feature cache not used: %.0f MB > train.cache_max_mb=%g",
                    size_mb, tcfg.cache_max_mb)  # fmt: skip
        return None
    return backbone.pooled_features(plain, x, tcfg.batch_size)


def _epoch_data(tf, strategy, x: np.ndarray, y: np.ndarray, preprocess: Any, batch_size: int, seed: int):
    """This worker's shard, reshuffled, in batches of `batch_size`, preprocessed.

    Built per replica by `distribute_datasets_from_function`: no auto-sharding (the shard is
    already this worker's) and no re-batching (the batch size is per worker). `x` is uint8
    pixels (with `preprocess`) or cached features (preprocess None).
    """
    dataset = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(max(1, len(x)), seed=seed, reshuffle_each_iteration=False)
        .batch(batch_size)
    )
    if preprocess is not None:
        dataset = dataset.map(lambda images, labels: (preprocess(images), labels))
    return strategy.distribute_datasets_from_function(lambda _: dataset.prefetch(2))


def _evaluate(tf, strategy, session, model, backbone, x, y, num_labels, batch_size) -> dict[str, float]:
    """Exact metrics over the whole validation set: worker r scores batches r, r+W, ...

    The same tally as the torch loop's, summed across workers by a strategy all-reduce.
    """
    import torch

    from tl_ray.train.metrics import ClassificationTally

    rank, world = session.rank, session.world
    tally = ClassificationTally(num_labels)
    for index, start in enumerate(range(0, len(x), batch_size)):
        if index % world != rank:
            continue
        logits = backbone.scores(model, backbone.preprocess_pixels(x[start : start + batch_size]))
        tally.add(torch.from_numpy(logits), torch.from_numpy(y[start : start + batch_size]))

    def all_reduce(flat: torch.Tensor) -> torch.Tensor:
        if not session.distributed:  # one worker in its own process: nothing to sum
            return flat
        values = strategy.experimental_distribute_values_from_function(lambda _: tf.constant(flat.numpy()))
        return torch.from_numpy(strategy.reduce(tf.distribute.ReduceOp.SUM, values, axis=None).numpy())

    tally.reduce(all_reduce)
    return tally.metrics(prefix="val_")

