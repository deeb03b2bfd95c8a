"""Launch one Ray Train run for a RunConfig and export its best checkpoint.

Example:
    >>> outcome = train(load_config("examples/minilm-sentiment.yaml"))  # doctest: +SKIP
    >>> outcome.model_dir                                               # doctest: +SKIP
    PosixPath('runs/minilm-sentiment/model')
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import ray
import ray.train
from ray.train.torch import TorchTrainer

from tl_ray import ray_logs
from tl_ray.backbones.registry import get_backbone
from tl_ray.config import RunConfig
from tl_ray.data import Datasets, load_datasets
from tl_ray.errors import ConfigError, TLRayError
from tl_ray.storage import check_reachable, fetch_checkpoint, storage_location
from tl_ray.train.checkpoint import export_model_folder
from tl_ray.train.events import EpochWriter, tensorboard_dir
from tl_ray.train.feature_cache import ensure_cache, plan_cache
from tl_ray.train.loop import run_torch_loop, train_loop_per_worker
from tl_ray.train.relay import epochs_to
from tl_ray.net import free_port

__all__ = ["TrainOutcome", "build_trainer", "ensure_ray", "run_in_trial", "run_name", "train", "worker_resources"]

log = logging.getLogger("tl_ray.train")



def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` / RAY_ADDRESS, or start an embedded local Ray.

    A local Ray gets its own dashboard port, and its workers are told that address: Ray
    Train's placement-group cleaner asks the State API whether a run's controller is alive,
    and with two local Ray instances on one machine that lookup fails, leaking the placement
    groups of trials that Tune stopped (a later trial then waits for CPUs forever).
    """
    ray_logs.attach()  # under `tl-ray`: Ray's output to OUTPUT/ray.log, not the terminal
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        ray.init(address=address, logging_level=logging.WARNING)
        ray_logs.attach()
        return
    api = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{free_port()}"}
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_port=int(api["RAY_API_SERVER_ADDRESS"].rsplit(":", 1)[1]),
        logging_level=logging.WARNING,
        runtime_env={"env_vars": api},
    )
    os.environ.update(api)  # this process's State API calls go to the same instance
    ray_logs.attach()


# Backbone kinds trained by the Keras loop under TensorflowTrainer; every other kind: torch.
KERAS_KINDS = frozenset({"keras-image"})


def _trainer_and_loop(kind: str) -> tuple[Any, Callable[[dict[str, Any]], None]]:
    """A fixed mapping from the backbone kind to (Trainer class, per-worker loop)."""
    if kind in KERAS_KINDS:
        from ray.train.tensorflow import TensorflowTrainer

        from tl_ray.train.keras_loop import keras_train_loop_per_worker

        return TensorflowTrainer, keras_train_loop_per_worker
    return TorchTrainer, train_loop_per_worker


def _loop_config(
    cfg: RunConfig, datasets: Datasets, cache_dir: str | Path | None, *, inline: bool = False
) -> dict[str, Any]:
    """What the per-worker loop gets: the run, labels, training-set size and the cache.

    With `cache_dir` (a path or URI every node reaches), the frozen bottom's output is
    published there once (or reused) and each worker reads its node's copy of it instead of
    running the frozen layers (see `feature_cache`).
    """
    cache = None
    if cache_dir is not None:
        plan = plan_cache(cfg, datasets, cache_dir)  # published there: a shared path or a URI
        location = plan and ensure_cache(plan, cfg, datasets, inline=inline)
        cache = location and {"location": location, "key": plan.key}  # FeatureCache.open(**cache)
    return {
        "run": cfg.model_dump(),
        "labels": list(datasets.labels.labels),
        "train_rows": datasets.train.num_rows,
        "cache": cache,
    }


def build_trainer(
    cfg: RunConfig,
    datasets: Datasets,
    *,
    storage_path: str,
    name: str,
    callbacks: list[Any] | None = None,
    cache_dir: str | Path | None = None,
) -> TorchTrainer:
    """A TorchTrainer (TensorflowTrainer for Keras kinds) for `cfg`: datasets stream to the
    workers through Ray Data; checkpoints go to STORAGE_PATH/NAME."""
    tcfg = cfg.train
    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = False
    data_context.print_on_execution_start = False
    trainer_class, loop = _trainer_and_loop(cfg.backbone.kind)  # Keras kinds: TensorflowTrainer
    return trainer_class(
        loop,
        train_loop_config=_loop_config(cfg, datasets, cache_dir),
        scaling_config=ray.train.ScalingConfig(
            num_workers=tcfg.num_workers,
            use_gpu=tcfg.use_gpu,
            resources_per_worker=worker_resources(cfg),
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=tcfg.keep_checkpoints,
                checkpoint_score_attribute=tcfg.metric,
                checkpoint_score_order=tcfg.metric_mode,
            ),
            failure_config=ray.train.FailureConfig(max_failures=tcfg.max_failures),
            callbacks=callbacks or [],
        ),
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        datasets={
            "train": ray.data.from_arrow(_numbered(datasets.train)),
            "validation": ray.data.from_arrow(_numbered(datasets.validation)),
        },
    )


def worker_resources(cfg: RunConfig) -> dict[str, float]:
    """What one training worker reserves: {"CPU": cpus_per_worker} (+ {"GPU": 1} with use_gpu).

    >>> from tl_ray.config import parse_config
    >>> worker_resources(parse_config({"data": {"path": "x"}, "train": {"use_gpu": True}}))
    {'CPU': 1.0, 'GPU': 1}
    """
    return {"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if cfg.train.use_gpu else {})}


def run_in_trial(
    cfg: RunConfig, datasets: Datasets, *, storage_path: str, name: str, cache_dir: str | Path | None = None
) -> None:
    """Run the one-worker loop in this Tune trial's own process (no Train run to start).

    Checkpoints go to STORAGE_PATH/NAME in the layout a Train run of that name uses, and the
    loop resumes from the latest one there, so a retried trial continues where it stopped.
    Each epoch reaches Tune through `ray.tune.report`, with `checkpoint_path`.
    """
    from tl_ray.train.session import CheckpointStore, TrialSession

    tcfg = cfg.train
    if tcfg.num_workers != 1:
        raise ConfigError(f"a trial runs in its own process only with train.num_workers 1, "
                          f"not {tcfg.num_workers}")  # fmt: skip
    store = CheckpointStore(f"{storage_path.rstrip('/')}/{name}", keep=tcfg.keep_checkpoints,
                            metric=tcfg.metric, mode=tcfg.metric_mode)  # fmt: skip
    tables = {"train": _numbered(datasets.train), "validation": _numbered(datasets.validation)}
    session = TrialSession(tables, store, cpus=tcfg.cpus_per_worker)
    config = _loop_config(cfg, datasets, cache_dir, inline=True)  # this process holds the CPUs
    if cfg.backbone.kind in KERAS_KINDS:
        from tl_ray.train.keras_loop import run_keras_loop

        run_keras_loop(config, session)
    else:
        run_torch_loop(config, session)


def run_name(prefix: str = "train") -> str:
    """A run name no other run gets: Ray Train resumes a run whose name already has
    checkpoints, so two runs started in the same second must not share one.

    >>> run_name() != run_name()
    True
    """
    return f"{prefix}_{time.strftime('%Y-%m-%d_%H-%M-%S')}_{uuid.uuid4().hex[:8]}"


def _numbered(table: pa.Table) -> pa.Table:
    """The table with a `row` column: its row numbers, the key of cached features."""
    return table.append_column("row", pa.array(range(table.num_rows), type=pa.int64()))


def _load_inputs(cfg: RunConfig, input_kind: str) -> Datasets:
    """The run's data, checked against what the backbone reads (text or images)."""
    if input_kind == "image":
        from tl_ray.images import load_image_datasets

        return load_image_datasets(cfg.data, seed=cfg.train.seed)
    datasets = load_datasets(cfg.data, seed=cfg.train.seed)
    if "text" not in datasets.train.column_names:
        raise ConfigError(f"backbone kind {cfg.backbone.kind} reads text, but {cfg.data.path} "
                          "holds images; use backbone kind keras-image")
    return datasets


def _user_error(error: BaseException) -> TLRayError | None:
    """The TLRayError a worker raised, if that is why training failed."""
    failures = list(getattr(error, "worker_failures", {}).values()) + [error.__cause__]
    for failure in failures:
        for candidate in (failure, getattr(failure, "cause", None)):
            if isinstance(candidate, TLRayError):
                return candidate
    return None


@dataclass(frozen=True)
class TrainOutcome:
    """Where the best model went and how it scored."""

    model_dir: Path
    checkpoint_dir: str
    metrics: dict[str, Any]  # of the best checkpoint (the exported model)
    final_metrics: dict[str, Any]  # of the last epoch


def train(
    cfg: RunConfig,
    *,
    address: str | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainOutcome:
    """Fine-tune `cfg.backbone` on `cfg.data`; the best checkpoint is exported to OUTPUT/model."""
    backbone = get_backbone(cfg.backbone)
    datasets = _load_inputs(cfg, backbone.input_kind)
    backbone.check()  # fail fast on the driver, before any worker starts
    ensure_ray(address)
    output = Path(cfg.output).expanduser().resolve()
    output.mkdir(parents=True, exist_ok=True)
    ray_logs.log_to(output)
    storage = storage_location(cfg.storage_path, output)  # checkpoints: storage_path or output
    check_reachable(storage)  # on a multi-node cluster every node must see a plain path
    name = run_name()
    events = EpochWriter(tensorboard_dir(output) / name)  # TensorBoard: OUTPUT/tensorboard/<run>

    def report(metrics: dict[str, Any]) -> None:
        events.write(metrics)
        if on_epoch is not None:
            on_epoch(metrics)

    try:
        with epochs_to(report) as relay:  # the controller's reports, handled here
            trainer = build_trainer(
                cfg,
                datasets,
                storage_path=storage,
                name=name,
                callbacks=[relay],
                cache_dir=f"{storage.rstrip('/')}/cache",  # under storage_path: every node can fetch it
            )
            result = trainer.fit()
    except ray.train.TrainingFailedError as error:
        user_error = _user_error(error)
        if user_error is not None:
            raise user_error from None
        raise
    finally:
        events.close()
    best = result.get_best_checkpoint(cfg.train.metric, cfg.train.metric_mode) or result.checkpoint
    if best is None:
        raise TLRayError(f"training reported no checkpoint; see the worker logs in {output / ray_logs.LOG_NAME}")
    model_dir = export_model_folder(fetch_checkpoint(best.path, storage), output / "model")
    from tl_ray.train.checkpoint import read_manifest

    return TrainOutcome(model_dir, best.path, read_manifest(model_dir)["metrics"], result.metrics or {})
