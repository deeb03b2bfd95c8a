"""The per-worker training loop: setup, data, model, optimizer, then epochs.

Ray appears only through the session (`session.py`): where the loop gets its data shard and
resume checkpoint, prepares the model for DDP, and reports metrics with a checkpoint. The same
loop runs in a Ray Train worker (`train_loop_per_worker`) and in a one-worker Tune trial's own
process (`run_torch_loop(config, TrialSession(...))`); everything else is plain PyTorch.
"""

from __future__ import annotations

import gc
import math
import os
import pickle
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import ray
import torch

from tl_ray.backbones.registry import get_backbone
from tl_ray.config import parse_config
from tl_ray.data import LabelMap
from tl_ray.errors import CheckpointError
from tl_ray.train.checkpoint import TRAIN_STATE_FILE, read_manifest
from tl_ray.train.feature_cache import FeatureCache
from tl_ray.train.metrics import ClassificationTally, all_reduce_sum
from tl_ray.train.session import TrainSession, report_epoch
from tl_ray.train.step import TrainStep, autocast_for

__all__ = ["run_torch_loop", "train_loop_per_worker"]


def _batches(shard: Any, batch_size: int, seed: int | None) -> Iterator[dict[str, np.ndarray]]:
    shuffle = {"local_shuffle_buffer_size": 4 * batch_size, "local_shuffle_seed": seed}
    yield from shard.iter_batches(
        batch_size=batch_size, batch_format="numpy", **(shuffle if seed is not None else {})
    )


def read_train_state(folder: Path) -> dict[str, Any]:
    """The optimizer, scheduler and epoch saved beside a checkpoint (tensors and plain data
    only: `weights_only=True`, so a tampered file cannot run code on load)."""
    try:
        return torch.load(Path(folder) / TRAIN_STATE_FILE, weights_only=True, map_location="cpu")
    except (OSError, RuntimeError, pickle.UnpicklingError) as error:
        raise CheckpointError(
            f"{folder}: cannot resume from {TRAIN_STATE_FILE} ({str(error).splitlines()[0]})"
        ) from None


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Fine-tune one backbone; run by every Ray Train worker with the same `config`.

    `config` holds `run` (a RunConfig.model_dump()), `labels` (label names in id order),
    `train_rows` (the size of the training set, for the learning-rate schedule) and `cache`.
    """
    run_torch_loop(config, TrainSession())


def run_torch_loop(config: dict[str, Any], session: Any) -> None:
    """The loop itself, in `session` (a TrainSession or a TrialSession)."""
    # -- setup ----------------------------------------------------------------------------
    cfg = parse_config(config["run"])
    tcfg = cfg.train
    labels = LabelMap(tuple(config["labels"]))
    world = session.world
    torch.manual_seed(tcfg.seed)
    device = session.device

    # -- data -----------------------------------------------------------------------------
    train_shard = session.shard("train")
    val_data = session.shard("validation")  # not split: see _evaluate
    steps_per_epoch = math.ceil(config["train_rows"] / world / tcfg.batch_size)
    total_steps = steps_per_epoch * tcfg.epochs

    # -- model (fresh, or resumed from the last reported checkpoint) ----------------------
    backbone = get_backbone(cfg.backbone)
    cache = FeatureCache.open(**config["cache"]) if config.get("cache") else None  # this node's copy

    cached = cache is not None  # this epoch's frozen boundary is the cache's (see the loop)

    def inputs_of(batch: dict[str, np.ndarray], split: str) -> dict[str, torch.Tensor]:
        """Token ids, or the frozen bottom's cached output for these rows."""
        if cached:
            inputs = cache.batch(split, batch["row"])
        else:
            inputs = backbone.preprocess(list(batch["text"]), tcfg.max_length)
        return {k: v.to(device) for k, v in inputs.items()}

    checkpoint = session.checkpoint()
    state: dict[str, Any] | None = None
    if checkpoint is None:
        model = backbone.build(num_labels=len(labels))
    else:
        with checkpoint.as_directory() as folder:
            model = backbone.load(Path(folder), num_labels=len(labels), trainable=True)
            state = read_train_state(Path(folder))
            state["metrics"] = read_manifest(Path(folder))["metrics"]
    depth = backbone.depth_at(1)  # the unfreeze depth in force (backbone.unfreeze_schedule)
    backbone.apply_unfreeze(model, depth)

    # -- optimizer (AdamW, train.schedule; both resumed with the model) -------------------
    step = TrainStep.build(backbone, model, session.prepare_model(model), cfg, total_steps=total_steps,
                           device=device)  # fmt: skip
    first_epoch = 1
    if state is not None:
        resumed_depth = _replay_unfreezing(step, backbone, state, depth, Path(checkpoint.path).name)
        if resumed_depth != depth:
            depth = resumed_depth
            _rewrap(step, session, model)
        first_epoch = state["epoch"] + 1

    def report(metrics: dict[str, Any], epoch: int) -> None:
        report_epoch(session, metrics, backbone=backbone, model=model, labels=labels, epoch=epoch,
                     cfg=cfg, extra={"max_length": tcfg.max_length},
                     state={**step.state_dict(), "epoch": epoch, "unfreeze_depth": depth})  # fmt: skip

    # -- loop -----------------------------------------------------------------------------
    if state is not None:
        # Report the epoch resumed from once more: a driver stopped after its checkpoint was
        # saved but before it logged the report never saw it (nor its row, nor its Optuna
        # value), and a run resumed after its last epoch ends with a result. Readers key
        # epochs by number, so one seen already counts once; this report names the resume.
        report({**state["metrics"], "resumed_from_epoch": state["epoch"]}, state["epoch"])
    for epoch in range(first_epoch, tcfg.epochs + 1):
        started = time.perf_counter()
        if backbone.depth_at(epoch) != depth:  # a step of the unfreeze schedule
            depth = backbone.depth_at(epoch)
            step.unfreeze(depth)  # the optimizer gains the newly unfrozen parameters
            _rewrap(step, session, model)  # DDP's gradient hooks cover them
        # The feature cache serves the epochs at its frozen boundary; deeper, the full model runs.
        cached = cache is not None and backbone.prefix_cache(depth) == cache.meta["boundary"]
        batches = _batches(train_shard, tcfg.batch_size, tcfg.seed + epoch)
        seen, loss_sum = step.epoch(batches, lambda batch: inputs_of(batch, "train"))
        elapsed = time.perf_counter() - started

        metrics = _evaluate(session, model, backbone, val_data, len(labels), tcfg, inputs_of)
        local = torch.stack([torch.tensor(float(seen), dtype=torch.float64, device=device),
                             loss_sum, torch.tensor(elapsed, dtype=torch.float64, device=device)])
        total_seen, total_loss, total_s = all_reduce_sum(local, device).tolist()
        metrics.update(
            epoch=epoch,
            train_loss=total_loss / max(1.0, total_seen),
            samples_per_s=total_seen / (total_s / world),
            lr=step.lr,
            unfreeze_depth=depth,
            epoch_s=time.perf_counter() - started,  # training and validation
            resumed_from_epoch=first_epoch - 1,
            node_id=ray.get_runtime_context().get_node_id(),  # which cluster node trained this
            worker_pid=os.getpid(),  # a trial's own pid when it trains in its own process
        )
        report(metrics, epoch)


def _rewrap(step: TrainStep, session: Any, model: torch.nn.Module) -> None:
    """Prepare `model` for DDP again, over the parameters that train now (DDP's reducer takes
    the set that requires grad when it is built). The old wrapper goes first: while it lives,
    its reducer's hooks fire on every backward pass, with a bucket layout the other ranks'
    new wrappers no longer share."""
    step.model = None
    gc.collect()
    step.model = session.prepare_model(model)


def _replay_unfreezing(step: TrainStep, backbone: Any, state: dict[str, Any], depth: int, where: str) -> int:
    """Unfreeze as the run did up to its saved epoch, so the optimizer holds the parameter
    groups its saved state has (in the same order), then load that state; the depth now."""
    for epoch in range(2, state["epoch"] + 1):
        if backbone.depth_at(epoch) != depth:
            depth = backbone.depth_at(epoch)
            step.unfreeze(depth)
    saved = state.get("unfreeze_depth", depth)
    try:
        if saved != depth:
            raise ValueError(f"it was saved at unfreeze depth {saved}, the schedule gives {depth}")
        step.load_state_dict(state)
    except ValueError as error:  # torch: "loaded state dict contains a parameter group that ..."
        raise CheckpointError(f"{where}: cannot resume at epoch {state['epoch'] + 1} ({str(error).splitlines()[0]});"
                              " resume with the config (and unfreeze schedule) it was trained with") from None
    return depth


@torch.no_grad()
def _evaluate(session, model, backbone, dataset, num_labels, tcfg, inputs_of) -> dict[str, float]:
    """Exact metrics over the whole validation set: worker r scores batches r, r+W, ..."""
    rank, world = session.rank, session.world
    model.eval()
    device = session.device  # the backend's device: NCCL reduces only CUDA tensors
    tally = ClassificationTally(num_labels, device=device)
    for index, batch in enumerate(_batches(dataset, tcfg.batch_size, None)):
        if index % world != rank:
            continue
        inputs = inputs_of(batch, "validation")
        with autocast_for(device):
            logits = backbone.logits(model, inputs).float()
        tally.add(logits, torch.as_tensor(batch["label"], device=device))
    tally.reduce(lambda flat: all_reduce_sum(flat, device))
    return tally.metrics(prefix="val_")

