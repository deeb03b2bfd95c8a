"""backbone.unfreeze_schedule: the depth at each epoch, which parameters train and what the
optimizer holds at each step (hf-text, word-vectors, keras-image), resuming mid-schedule, the
feature cache serving the epochs at its boundary, and invalid schedules refused up front.

The loop runs in this process (`run_torch_loop` / `run_keras_loop`) through a minimal session.
"""

from __future__ import annotations

import weakref
from typing import Any

import pyarrow as pa
import pytest
import torch
from helpers import LocalSession, make_sentiment_rows

from tl_ray import unfreeze
from tl_ray.backbones.registry import get_backbone
from tl_ray.config import parse_config
from tl_ray.errors import BackboneError, CheckpointError, ConfigError
from tl_ray.train.step import TrainStep

NAMES = ("neg", "pos")


def _text_tables(n: int = 48) -> dict[str, pa.Table]:
    rows = make_sentiment_rows(n)
    table = pa.table({"text": [t for t, _ in rows], "label": [NAMES.index(label) for _, label in rows],
                      "row": list(range(n))})  # fmt: skip
    return {"train": table, "validation": table.slice(0, 16)}


def _loop_config(run: dict, tables: dict[str, pa.Table], cache: dict | None = None) -> dict:
    return {"run": run, "labels": list(NAMES), "train_rows": tables["train"].num_rows, "cache": cache}


# -- the schedule itself -----------------------------------------------------------------------
def test_depth_per_epoch_counts_epochs_from_one():
    steps = unfreeze.parse_schedule([[2, 1], [4, 3]])
    assert [unfreeze.depth_at(steps, e, base=0, layers=6) for e in range(1, 6)] == [None, 1, 1, 3, 3]
    rule = unfreeze.parse_schedule({"gradual": {"start": 2, "every": 2, "step": 3}})
    assert rule == {"gradual": {"start": 2, "every": 2, "step": 3}}
    assert [unfreeze.depth_at(rule, e, base=1, layers=6) for e in range(1, 9)] == [
        None, 1, 1, 4, 4, 6, 6, 6]  # capped at the layer count
    cfg = parse_config({"data": {"path": "x"}, "train": {"epochs": 4},
                        "backbone": {"unfreeze_schedule": {"gradual": {}}}})  # fmt: skip
    assert cfg.backbone.unfreeze_schedule == {"gradual": {"start": 1, "every": 1, "step": 1}}


def test_keras_phases_are_the_one_step_schedule():
    legacy = parse_config({"data": {"path": "x"}, "train": {"epochs": 5},
                           "backbone": {"kind": "keras-image", "head_epochs": 2, "unfreeze_depth": 4}})
    scheduled = parse_config({"data": {"path": "x"}, "train": {"epochs": 5},
                              "backbone": {"kind": "keras-image", "unfreeze_schedule": [[3, 4]]}})
    for cfg in (legacy, scheduled):
        backbone = get_backbone(cfg.backbone)
        assert [(backbone.phase_of(e), backbone.depth_at(e)) for e in range(1, 6)] == [
            ("head", 0), ("head", 0), ("finetune", 4), ("finetune", 4), ("finetune", 4)]
    default = get_backbone(parse_config({"data": {"path": "x"}, "backbone": {"kind": "keras-image"}}).backbone)
    assert [default.phase_of(e) for e in (1, 2, 3)] == ["head", "finetune", "finetune"]  # as before
    assert default.learning_rate("head") == 1e-3 and default.learning_rate("finetune") == 1e-5


@pytest.mark.parametrize("backbone, train, message", [
    ({"unfreeze_schedule": [[1, -1]]}, {}, "must be >= 0"),
    ({"unfreeze_schedule": [[-1, 2]]}, {}, "must be >= 0"),
    ({"unfreeze_schedule": [[2, 1], [2, 2]]}, {}, "strictly increasing"),
    ({"unfreeze_schedule": [[3, 1], [2, 2]]}, {}, "strictly increasing"),
    ({"unfreeze_schedule": [[1, 2], [2, 1]]}, {}, "must not decrease"),
    ({"unfreeze_depth": 3, "unfreeze_schedule": [[2, 1]]}, {}, "must not decrease"),
    ({"unfreeze_schedule": [[1, 0], [4, 2]]}, {"epochs": 3}, "a step at epoch 4 is past train.epochs"),
    ({"unfreeze_schedule": {"gradual": {"start": 5}}}, {"epochs": 3}, "gradual.start (5) must be <="),
    ({"unfreeze_schedule": {"gradual": {"every": 0}}}, {}, "gradual.every must be an integer >= 1"),
    ({"unfreeze_schedule": {"gradual": {"start": -1}}}, {}, "gradual.start must be an integer >= 0"),
    ({"unfreeze_schedule": {"gradual": {"by": 1}}}, {}, "unknown key 'by' in gradual"),
    ({"unfreeze_schedule": {"linear": {}}}, {}, "a rule must be"),
    ({"unfreeze_schedule": [[1, 0, 2]]}, {}, "pair of integers"),
    ({"unfreeze_schedule": 3}, {}, "expected a list of [epoch, depth] steps"),
    ({"unfreeze_schedule": [[1, 1]], "mode": "lora"}, {}, "needs mode: finetune"),
    ({"kind": "keras-image", "unfreeze_schedule": [[2, 1]], "head_epochs": 1}, {}, "not both"),
])  # fmt: skip
def test_invalid_schedules_are_one_line_config_errors(backbone, train, message):
    with pytest.raises(ConfigError) as error:
        parse_config({"data": {"path": "x"}, "backbone": backbone, "train": train})
    assert message in str(error.value) and "\n" not in str(error.value)
    assert "unfreeze_schedule" in str(error.value) or "head_epochs" in str(error.value)


def test_a_depth_above_the_layer_count_fails_in_check(tiny_bert, tiny_vectors):
    for backbone, layers in (({"name_or_path": tiny_bert, "unfreeze_schedule": [[1, 0], [2, 3]]}, 2),
                             ({"kind": "word-vectors", "vectors": tiny_vectors, "unfreeze_schedule": [[2, 2]]}, 1),
                             ({"kind": "keras-image", "architecture": "VGG16", "unfreeze_schedule": [[2, 14]]}, 13)):
        cfg = parse_config({"data": {"path": "x"}, "backbone": backbone})
        with pytest.raises(BackboneError, match=rf"unfreeze_schedule: depth \d+ at epoch 2 must be between 0 and "
                                                rf"{layers}"):  # fmt: skip
            get_backbone(cfg.backbone).check()


def test_train_refuses_a_bad_schedule_before_any_worker_starts(tiny_bert, sentiment_csv, tmp_path, monkeypatch,
                                                               capsys):
    from tl_ray.cli.app import main
    from tl_ray.train import driver

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started")

    monkeypatch.setattr(driver, "ensure_ray", no_ray)
    for schedule, message in (("[[1, 0], [2, 5]]", "depth 5 at epoch 2 must be between 0 and 2"),
                              ("[[1, 0], [1, 1]]", "strictly increasing"),
                              ("[[1, 0], [9, 1]]", "past train.epochs (3)")):
        config = tmp_path / "run.yaml"
        config.write_text(f"data: {{path: {sentiment_csv}}}\n"
                          f"backbone: {{name_or_path: {tiny_bert}, unfreeze_schedule: {schedule}}}\n"
                          f"output: {tmp_path / 'out'}\n", encoding="utf-8")  # fmt: skip
        assert main(["train", str(config)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines


# -- which parameters train, and what the optimizer holds ---------------------------------------
def _optimizer_params(step: TrainStep) -> set[int]:
    return {id(p) for group in step.optimizer.param_groups for p in group["params"]}


def _trainable(model: torch.nn.Module) -> set[int]:
    return {id(p) for p in model.parameters() if p.requires_grad}


def test_word_vectors_unfreeze_the_embedding_and_the_optimizer_gains_it(tiny_vectors):
    cfg = parse_config({"data": {"path": "x"}, "train": {"epochs": 3, "lr": 0.1},
                        "backbone": {"kind": "word-vectors", "vectors": tiny_vectors, "unfreeze_depth": 0,
                                     "unfreeze_schedule": [[3, 1]], "lr_decay": 0.5}})  # fmt: skip
    backbone = get_backbone(cfg.backbone)
    assert [backbone.depth_at(e) for e in (1, 2, 3)] == [0, 0, 1]
    model = backbone.build(num_labels=2)
    backbone.apply_unfreeze(model, backbone.depth_at(1))
    step = TrainStep.build(backbone, model, model, cfg, total_steps=10, device=torch.device("cpu"))
    assert not model.embedding.weight.requires_grad and _optimizer_params(step) == _trainable(model)
    for _ in range(4):
        step.optimizer.step(), step.scheduler.step()
    factor = step.scheduler.lr_lambdas[0](step.scheduler.last_epoch)
    assert step.unfreeze(1) == 1  # the embedding's one weight
    assert model.embedding.weight.requires_grad and _optimizer_params(step) == _trainable(model)
    added = step.optimizer.param_groups[-1]
    assert added["params"] == [model.embedding.weight]
    assert added["lr"] == pytest.approx(0.1 * 0.5 * factor)  # its layer-wise rate, on the schedule
    step.optimizer.step(), step.scheduler.step()
    assert step.scheduler.get_last_lr()[-1] == pytest.approx(0.05 * step.scheduler.lr_lambdas[0](5))


def test_hf_text_schedule_sets_requires_grad_and_the_optimizer_each_epoch(ray_session, tiny_bert, tmp_path,
                                                                          monkeypatch):
    from tl_ray.train.loop import run_torch_loop

    run = parse_config({
        "data": {"path": "x"},
        "backbone": {"name_or_path": tiny_bert, "pooling": "cls", "lr_decay": 0.8,
                     "unfreeze_schedule": {"gradual": {"start": 1, "every": 1, "step": 1}}},
        "train": {"epochs": 3, "batch_size": 16, "max_length": 16, "lr": 1e-3, "cache": False},
    }).model_dump()  # fmt: skip
    tables = _text_tables()
    seen: list[tuple[set[str], bool]] = []
    epoch_once = TrainStep.epoch

    def recording(self: TrainStep, batches, inputs_of):
        names = {n for n, p in self.raw_model.named_parameters() if p.requires_grad}
        seen.append((names, _optimizer_params(self) == _trainable(self.raw_model)))
        return epoch_once(self, batches, inputs_of)

    monkeypatch.setattr(TrainStep, "epoch", recording)
    session = LocalSession(tables, tmp_path)
    run_torch_loop(_loop_config(run, tables), session)
    assert [r["unfreeze_depth"] for r in session.reports] == [0, 1, 2]
    layers = [{n.split(".")[3] for n in names if ".layer." in n} for names, _ in seen]
    assert layers == [set(), {"1"}, {"0", "1"}]
    assert all(exact for _, exact in seen)  # the optimizer holds exactly what trains
    assert not any("embeddings" in n for n in seen[1][0]) and any("embeddings" in n for n in seen[2][0])
    assert not any("pooler" in n for n in seen[0][0]) and any("pooler" in n for n in seen[1][0])


def _vectors_run(tiny_vectors: str) -> dict:
    """Word vectors, frozen embedding in epoch 1, trained from epoch 2 (of 3)."""
    return {"data": {"path": "x"},
            "backbone": {"kind": "word-vectors", "vectors": tiny_vectors, "unfreeze_depth": 0, "dropout": 0.0,
                         "unfreeze_schedule": [[2, 1]]},
            "train": {"epochs": 3, "batch_size": 16, "max_length": 16, "lr": 1e-2, "cache": False}}  # fmt: skip


def test_resume_mid_schedule_continues_at_the_depth_in_force(ray_session, tiny_vectors, tmp_path):
    from tl_ray.train.loop import run_torch_loop

    raw = _vectors_run(tiny_vectors)
    tables = _text_tables(60)
    straight = LocalSession(tables, tmp_path / "straight")
    run_torch_loop(_loop_config(parse_config(raw).model_dump(), tables), straight)
    assert [r["unfreeze_depth"] for r in straight.reports] == [0, 1, 1]
    for resume_from in (1, 2):  # before the step, and after it (the optimizer then holds two phases)
        resumed = LocalSession(tables, tmp_path / f"resumed-{resume_from}", tmp_path / "straight" / f"epoch-{resume_from}")
        run_torch_loop(_loop_config(parse_config(raw).model_dump(), tables), resumed)
        again = straight.reports[resume_from - 1 :]  # the epoch resumed from is reported once more
        assert [r["epoch"] for r in resumed.reports] == [r["epoch"] for r in again]
        assert [r["unfreeze_depth"] for r in resumed.reports] == [r["unfreeze_depth"] for r in again]
        assert [r["lr"] for r in resumed.reports] == [r["lr"] for r in again]
        for got, want in zip(resumed.reports, again):
            assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-5), resume_from
    changed = {**raw, "backbone": {**raw["backbone"], "unfreeze_schedule": [[3, 1]]}}
    with pytest.raises(CheckpointError, match="cannot resume at epoch 3"):  # not a torch traceback
        run_torch_loop(_loop_config(parse_config(changed).model_dump(), tables),
                       LocalSession(tables, tmp_path / "changed", tmp_path / "straight" / "epoch-2"))


def test_cached_epochs_give_the_losses_of_uncached_ones(ray_session, tiny_bert, sentiment_csv, tmp_path,
                                                        monkeypatch):
    """Depth 1 for epochs 1-2 (the cache's boundary), depth 2 at epoch 3 (the full model)."""
    from tl_ray.data import load_datasets
    from tl_ray.train.driver import _loop_config as driver_loop_config
    from tl_ray.train.driver import _numbered
    from tl_ray.train.feature_cache import CACHE_DIR_ENV, FeatureCache
    from tl_ray.train.loop import run_torch_loop

    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "node"))
    reads: list[int] = []
    batch_once = FeatureCache.batch
    monkeypatch.setattr(FeatureCache, "batch", lambda self, split, rows: (reads.append(len(rows)),
                                                                          batch_once(self, split, rows))[1])
    reports = {}
    for cache in (True, False):
        cfg = parse_config({
            "data": {"path": str(sentiment_csv), "validation_split": 0.25},
            "backbone": {"name_or_path": tiny_bert, "pooling": "cls", "unfreeze_schedule": [[1, 1], [3, 2]]},
            "train": {"epochs": 3, "batch_size": 16, "max_length": 16, "lr": 2e-2, "seed": 3, "cache": cache},
        })  # fmt: skip
        datasets = load_datasets(cfg.data, seed=0)
        config = driver_loop_config(cfg, datasets, tmp_path / "cache", inline=True)
        assert (config["cache"] is not None) == cache
        tables = {"train": _numbered(datasets.train), "validation": _numbered(datasets.validation)}
        session = LocalSession(tables, tmp_path / str(cache))
        run_torch_loop(config, session)
        reports[cache] = session.reports
    assert sum(reads) == 2 * (180 + 60)  # epochs 1 and 2 read the cache, train and validation; 3 does not
    assert [r["unfreeze_depth"] for r in reports[True]] == [1, 1, 2]
    for cached, plain in zip(reports[True], reports[False]):
        for key in ("train_loss", "val_loss", "val_accuracy"):
            assert cached[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-5), (key, cached, plain)


def test_keras_schedule_recompiles_over_exactly_the_weights_that_train(ray_session, tmp_path, monkeypatch):
    import tf_keras
    from image_helpers import digits, png_bytes

    from tl_ray.train.keras_loop import run_keras_loop

    rows = digits((0, 1), 8)
    table = pa.table({"image": [png_bytes(p) for p, _ in rows], "label": [int(label) for _, label in rows]})
    run = parse_config({
        "data": {"path": "x"},
        "backbone": {"kind": "keras-image", "architecture": "MobileNetV2", "alpha": 0.35, "image_size": 32,
                     "unfreeze_schedule": [[2, 2], [3, 5]], "head_lr": 0.01, "finetune_lr": 0.001,
                     "batchnorm": "frozen"},
        "train": {"epochs": 3, "batch_size": 8},
    }).model_dump()  # fmt: skip
    fitted: list[tuple[set[str], set[str], int]] = []
    fit_once = tf_keras.Model.fit

    def recording(self, *args, **kwargs):
        history = fit_once(self, *args, **kwargs)
        trainable = {w.name for w in self.trainable_weights}
        slots = {v.name for v in self.optimizer.variables if "/m/" in v.name or "/v/" in v.name}
        fitted.append(({n.split("/")[0] for n in trainable}, slots, len(trainable)))
        return history

    monkeypatch.setattr(tf_keras.Model, "fit", recording)
    session = LocalSession({"train": table, "validation": table.slice(0, 4)}, tmp_path)
    run_keras_loop({"run": run, "labels": ["0", "1"], "train_rows": table.num_rows, "cache": None}, session)
    assert [(r["phase"], r["unfreeze_depth"], r["lr"]) for r in session.reports] == [
        (1, 0, 0.01), (2, 2, 0.001), (2, 5, 0.001)]
    layers = [names for names, _, _ in fitted]
    assert layers[0] == {"head"}
    assert layers[1] == {"head", "Conv_1", "block_16_project"}  # the top 2 units
    assert layers[1] < layers[2] and len(layers[2] - {"head"}) == 5
    for _, slots, count in fitted:  # Adam's two moments for every weight that trains, no others
        assert len(slots) == 2 * count


class _Wrapper(torch.nn.Module):
    """Stands for DDP: wraps the model and runs its forward."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


class WrappingSession(LocalSession):
    """`prepare_model` wraps, as Ray Train's does with DDP; records how many earlier wrappers
    are still alive at each call (a live DDP keeps its gradient hooks on the parameters)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.wrappers: list[weakref.ref] = []
        self.alive: list[int] = []
        self.used: set[int] = set()  # the wrappers (by number) a forward pass ran through

    def prepare_model(self, model: Any) -> Any:
        self.alive.append(sum(ref() is not None for ref in self.wrappers))
        wrapper, number = _Wrapper(model), len(self.wrappers)
        wrapper.register_forward_pre_hook(lambda module, args: self.used.add(number))
        self.wrappers.append(weakref.ref(wrapper))
        return wrapper


def test_an_unfreeze_step_rewraps_the_model_and_frees_the_old_wrapper(ray_session, tiny_vectors, tmp_path):
    """On a worker group the model is DDP-wrapped; DDP covers only the parameters that require
    grad when it is built, so a schedule step wraps again, and the old wrapper (its reducer and
    hooks) must be gone first, or its hooks fire on every later backward pass."""
    from tl_ray.train.loop import run_torch_loop

    raw = _vectors_run(tiny_vectors)
    tables = _text_tables(32)
    session = WrappingSession(tables, tmp_path / "straight")
    run_torch_loop(_loop_config(parse_config(raw).model_dump(), tables), session)
    assert session.alive == [0, 0]  # built once, wrapped again at epoch 2, the first one freed
    assert session.used == {0, 1}  # training ran through each wrapper in turn

    resumed = WrappingSession(tables, tmp_path / "resumed", tmp_path / "straight" / "epoch-2")
    run_torch_loop(_loop_config(parse_config(raw).model_dump(), tables), resumed)
    assert resumed.alive == [0, 0]  # built at the schedule's start, then at the depth in force
