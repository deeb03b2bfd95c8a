"""Ray Tune + Optuna search: each trial is one Ray Train run; the study lives in Optuna storage.

Experiment folder (`output` of the run config):
    search.json      the base config, space and options, so `--resume` needs only the folder
    study.db         the Optuna study (unless search.storage names another SQLAlchemy URL)
    tune_<time>/     Ray Tune's folders, one per launch (first run and each resume)
    trials/<id>/     each trial's Ray Train run and its checkpoints
    trials.parquet   every trial's parameters and per-epoch metrics
    tensorboard/     trial_<n>/ TensorBoard event files: per-epoch metrics and parameters
    ray.log          Ray's own output (under `tl-ray`; `--verbose` also shows it live)
    best.json        the best trial; its model is exported to model/

Example:
    >>> summary = run_search(load_config("run.yaml"), load_space("search_spaces/minilm-sentiment.yaml"))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from tl_ray import ray_logs
from tl_ray.backbones.registry import get_backbone
from tl_ray.config import RunConfig, SearchConfig, apply_overrides, parse_config
from tl_ray.data import Datasets, load_datasets
from tl_ray.errors import ConfigError, TLRayError
from tl_ray.io import write_json_atomic
from tl_ray.search.folds import check_folds, run_folds_in_trial
from tl_ray.search.progress import EpochLog, SearchProgress
from tl_ray.search.results import BEST_FILE, LOG_FILE, export_results
from tl_ray.search.searcher import BestEpochOptunaSearch, continued_seed
from tl_ray.search.tracking import MLflowTrials, TensorBoardTrials, open_mlflow, tensorboard_dir
from tl_ray.search.study import (
    Heartbeat,
    finished_trials,
    interrupted_numbers,
    open_study,
    run_name_of,
    settle_stale_trials,
)
from tl_ray.search.space import SearchSpace, flatten, parse_space, to_overrides, validate_against
from tl_ray.storage import check_reachable, fetch_checkpoint, is_uri, storage_location
from tl_ray.train.checkpoint import export_model_folder
from tl_ray.train.driver import build_trainer, ensure_ray, run_in_trial, run_name, worker_resources

__all__ = [
    "SEARCH_FILE",
    "STUDY_NAME",
    "in_process",
    "max_concurrent_trials",
    "resume_search",
    "run_search",
    "trial_resources",
]

SEARCH_FILE = "search.json"
STUDY_NAME = "tl-ray"  # the study of searches from before search.json named one
TRIAL_KEY = "optuna_trial"
RUN_KEY = "train_run"  # the trial's Ray Train run name, carried in each Tune trial's config
# A trial that only launches its Train run (whose workers hold the CPUs) asks for a little
# logical memory and no CPU, so N trials of W workers fit exactly on N x W CPUs. A trial that
# trains in its own process reserves its one worker's resources itself.
TRIAL_DRIVER_RESOURCES = {"memory": 64 * 1024**2}


def _sampler(options: SearchConfig, seed: int):
    """A fixed mapping from the config's sampler name to an Optuna sampler."""
    import optuna

    factories: dict[str, Callable[[], Any]] = {
        "tpe": lambda: optuna.samplers.TPESampler(
            seed=seed, multivariate=True, group=True, constant_liar=True
        ),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed),
    }
    return factories[options.sampler]()


def max_concurrent_trials(cfg: RunConfig, resources: dict[str, float]) -> int:
    """How many trials' worker groups the cluster holds at once (at least 1).

    Without this cap Tune starts more trials than there are worker slots; their Train
    runs then wait for placement groups and time out (see ENVIRONMENT.md).

    >>> cfg = parse_config({"data": {"path": "x"}, "train": {"num_workers": 2}})
    >>> max_concurrent_trials(cfg, {"CPU": 4.0})
    2
    """
    tcfg = cfg.train
    slots = math.floor(resources.get("CPU", 0) / (tcfg.num_workers * tcfg.cpus_per_worker))
    if tcfg.use_gpu:
        slots = min(slots, math.floor(resources.get("GPU", 0) / tcfg.num_workers))
    if slots < 1:
        need = f"{tcfg.num_workers} x {tcfg.cpus_per_worker} CPU" + (" + GPUs" if tcfg.use_gpu else "")
        raise ConfigError(
            f"the cluster ({resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU) "
            f"cannot hold one trial ({need}); lower train.num_workers or train.cpus_per_worker"
        )
    if cfg.search.max_concurrent_trials is not None:
        slots = min(slots, cfg.search.max_concurrent_trials)
    return max(1, min(slots, cfg.search.trials))


def in_process(cfg: RunConfig) -> bool:
    """Whether the search's trials run their loop in the trial's own process.

    >>> in_process(parse_config({"data": {"path": "x"}})), in_process(parse_config(
    ...     {"data": {"path": "x"}, "train": {"num_workers": 2}}))
    (True, False)
    """
    runner = cfg.search.trial_runner
    if runner == "in-process" and cfg.train.num_workers != 1:
        raise ConfigError(f"search.trial_runner in-process needs train.num_workers 1, not "
                          f"{cfg.train.num_workers}; use ray-train (or auto) for more workers")  # fmt: skip
    return runner == "in-process" or (runner == "auto" and cfg.train.num_workers == 1)


def trial_resources(cfg: RunConfig) -> dict[str, float]:
    """What one trial reserves: its worker's CPUs (and GPU) when it trains in its own
    process, else only the launcher's little memory (its Train workers reserve the rest)."""
    return worker_resources(cfg) if in_process(cfg) else dict(TRIAL_DRIVER_RESOURCES)


def _trial(
    params: dict[str, Any],
    *,
    base: dict[str, Any],
    datasets: Datasets,
    trials_dir: str,
    cache_dir: str,
    own_process: bool,
    space: SearchSpace | None = None,
) -> None:
    """One Tune trial: apply the sampled overrides and train, reporting each epoch to Tune.

    In its own process (`own_process`), else as a Ray Train run; both keep checkpoints under
    TRIALS_DIR/<run name>, so a retry of an interrupted trial continues that run.
    """
    sampled = {k: v for k, v in params.items() if k not in (TRIAL_KEY, RUN_KEY)}
    sampled = space.decode(sampled) if space is not None else sampled  # list/mapping choices
    cfg = parse_config(apply_overrides(base, to_overrides(sampled)))
    if own_process and cfg.search.cv_folds:
        run_folds_in_trial(cfg, datasets, storage_path=trials_dir, name=params[RUN_KEY])
        return
    if own_process:
        run_in_trial(cfg, datasets, storage_path=trials_dir, name=params[RUN_KEY], cache_dir=cache_dir)
        return
    trainer = build_trainer(
        cfg,
        datasets,
        storage_path=trials_dir,
        name=params[RUN_KEY],  # a retry of an interrupted trial continues its Train run
        callbacks=[TuneReportCallback()],
        cache_dir=cache_dir,  # shared by trials with the same boundary
    )
    trainer.fit()


@dataclass(frozen=True)
class _DefineByRun:
    """Optuna define-by-run space (a picklable callable: Tune checkpoints its searcher)."""

    space: SearchSpace
    fixed: dict[str, Any]

    def __call__(self, trial) -> dict[str, Any]:
        self.space.sample(trial, self.fixed)
        return {TRIAL_KEY: trial.number, RUN_KEY: run_name_of(trial)}


def _storage_url(cfg: RunConfig, folder: Path) -> str:
    return cfg.search.storage or f"sqlite:///{folder / 'study.db'}"


def run_search(
    cfg: RunConfig,
    space: SearchSpace,
    *,
    address: str | None = None,
    fixed_keys: list[str] | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Start a new search in `cfg.output`; returns the contents of best.json."""
    folder = Path(cfg.output).expanduser().resolve()
    if (folder / SEARCH_FILE).exists():
        raise ConfigError(
            f"{folder} already holds a search; resume it with `tl-ray tune --resume {folder}` "
            "or choose another output folder"
        )
    space = space.without(fixed_keys or [])
    if not space.params:
        raise ConfigError("every parameter of the space is fixed by --set; nothing to search")
    validate_against(space, cfg, max_depth=get_backbone(cfg.backbone).num_layers())
    if cfg.search.cv_folds:
        _check_cross_validation(cfg)
    ensure_ray(address)
    max_concurrent_trials(cfg, ray.cluster_resources())  # can the cluster hold one trial?
    folder.mkdir(parents=True, exist_ok=True)
    study = f"{STUDY_NAME}-{folder.name}-{uuid.uuid4().hex[:8]}"  # its own, in a shared storage
    write_json_atomic(
        folder / SEARCH_FILE,
        {"config": cfg.model_dump(), "space": space.to_dict(), "study": study, "created": time.time()},
    )
    return _launch(cfg, space, folder, study, address=address, echo=echo)


def _check_cross_validation(cfg: RunConfig) -> None:
    """search.cv_folds runs the folds in the trial's own process, on data with enough rows."""
    if not in_process(cfg):
        raise ConfigError(f"search.cv_folds needs in-process trials (train.num_workers 1, "
                          f"search.trial_runner auto or in-process), not {cfg.train.num_workers} workers "
                          f"with trial_runner {cfg.search.trial_runner}")  # fmt: skip
    check_folds(load_datasets(cfg.data, seed=cfg.train.seed), cfg.search.cv_folds)


def resume_search(
    folder: str | Path,
    *,
    address: str | None = None,
    trials: int | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Continue an interrupted search: finished trials are kept and seen by the sampler."""
    folder = Path(folder).expanduser().resolve()
    path = folder / SEARCH_FILE
    if not path.is_file():
        raise ConfigError(f"{folder} is not a tl-ray search folder: it has no {SEARCH_FILE}")
    saved = json.loads(path.read_text(encoding="utf-8"))
    raw = saved["config"]
    if trials is not None:
        raw = apply_overrides(raw, [f"search.trials={trials}"])
    cfg = parse_config(raw)
    study = saved.get("study", STUDY_NAME)
    return _launch(cfg, parse_space(saved["space"]), folder, study, address=address, echo=echo)


def _launch(cfg: RunConfig, space: SearchSpace, folder: Path, study_name: str, *, address, echo) -> dict[str, Any]:
    # best.json ranks epochs by the space's metric: each trial must keep its checkpoints by
    # the same metric, or the winning epoch's checkpoint may already be deleted.
    cfg = parse_config(apply_overrides(cfg.model_dump(), [f"train.metric={space.metric}"]))
    options = cfg.search
    ray_logs.log_to(folder)  # under `tl-ray`: Ray's output to FOLDER/ray.log
    storage, study = open_study(_storage_url(cfg, folder), study_name, space.mode)
    if study.get_trials(deepcopy=False):
        alive = settle_stale_trials(study)  # a dead driver's trials: failed, retries queued
        done, interrupted = finished_trials(study), len(interrupted_numbers(study))
        echo(f"resuming: {done} trials finished, {interrupted} interrupted (each continues from "
             "its last checkpoint)" + (f", {alive} still running elsewhere" if alive else ""))
    remaining = options.trials - finished_trials(study)
    if remaining > 0:
        datasets = load_datasets(cfg.data, seed=cfg.train.seed)
        ensure_ray(address)
        check_reachable(_trials_location(cfg, folder))  # every node writes checkpoints there
        seed = continued_seed(options.seed, len(study.get_trials(deepcopy=False)))
        _run_tuner(cfg, space, folder, storage, remaining, datasets, echo, seed, study_name)
    best = export_results(folder, study, space.metric, space.mode, max_epochs=cfg.train.epochs)
    return _fetch_best_model(cfg, folder, best)


def _trials_location(cfg: RunConfig, folder: Path) -> str:
    """Where the trials' Train runs keep checkpoints: STORAGE/trials (storage_path, else the folder)."""
    return storage_location(cfg.storage_path, folder).rstrip("/") + "/trials"


def _fetch_best_model(cfg: RunConfig, folder: Path, best: dict[str, Any]) -> dict[str, Any]:
    """With a URI storage_path the best checkpoint is remote: copy it into FOLDER/model."""
    if best.get("model") or not best.get("checkpoint") or not is_uri(cfg.storage_path or ""):
        return best
    local = fetch_checkpoint(best["checkpoint"], cfg.storage_path)
    best = {**best, "model": str(export_model_folder(local, folder / "model"))}
    write_json_atomic(folder / BEST_FILE, best)
    return best


def _run_tuner(cfg, space, folder, storage, remaining, datasets, echo, seed, study_name) -> None:
    options = cfg.search
    concurrency = min(max_concurrent_trials(cfg, ray.cluster_resources()), remaining)
    searcher = BestEpochOptunaSearch(
        space=_DefineByRun(space, flatten(cfg.model_dump())),
        metric=space.metric,
        mode=space.mode,
        sampler=_sampler(options, seed),  # a resumed search continues, it does not replay
        study_name=study_name,
        storage=storage,
        max_epochs=cfg.train.epochs,
    )
    scheduler = (
        ASHAScheduler(
            time_attr="epoch",
            max_t=cfg.train.epochs,
            grace_period=min(options.grace_period, cfg.train.epochs),
            reduction_factor=options.reduction_factor,
        )
        if options.early_stopping
        else FIFOScheduler()
    )
    # Tune's own console output (an experiment box, a TensorBoard hint into Ray's temp folder)
    # stays off: tl-ray prints a line per epoch and trial (SearchProgress). Set it to 1 to see it.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Tune's result.json / progress.csv stay; its TensorBoard files (one folder per launch, step
    # = iteration) give way to tl-ray's: OUTPUT/tensorboard/trial_<n>, step = epoch.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    tracking = [JsonLoggerCallback(), CSVLoggerCallback(), TensorBoardTrials(folder, space.metric)]
    if options.mlflow_uri:
        experiment = open_mlflow(options.mlflow_uri, options.mlflow_experiment or folder.name)
        tracking.append(MLflowTrials(options.mlflow_uri, experiment, study_name))
    own_process = in_process(cfg)
    runner = "in-process" if own_process else "a Ray Train run each"
    folds = f", {options.cv_folds}-fold cross-validation (each trial trains {options.cv_folds} models)"
    echo(f"searching {remaining} trials, {concurrency} at a time ({runner}), sampler {options.sampler}"
         + (folds if options.cv_folds else ""))
    echo(f"curves: tensorboard --logdir {tensorboard_dir(folder)}")
    launch = run_name("tune")
    trainable = tune.with_parameters(
        _trial,
        base=cfg.model_dump(),
        datasets=datasets,
        trials_dir=_trials_location(cfg, folder),  # may be a URI (storage_path)
        cache_dir=storage_location(cfg.storage_path, folder).rstrip("/") + "/cache",
        own_process=own_process,
        space=space,
    )
    tuner = tune.Tuner(
        tune.with_resources(trainable, trial_resources(cfg)),
        tune_config=tune.TuneConfig(
            # In-process, the next trial reuses the process: no start, imports or weight hashing.
            # (A Train-run trial stopped by ASHA is still inside fit(): Tune cannot reuse it.)
            reuse_actors=own_process,
            metric=space.metric,
            mode=space.mode,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=remaining,
            max_concurrent_trials=concurrency,
        ),
        run_config=tune.RunConfig(
            name=launch,
            storage_path=str(folder),
            callbacks=[SearchProgress(space.metric, space.mode, cfg.train.epochs, echo),
                       EpochLog(folder / LOG_FILE, launch), *tracking],  # fmt: skip
            # A trial in its own process restarts after a crash and resumes from its last
            # checkpoint; a Ray Train run restarts its own workers (train.max_failures).
            failure_config=tune.FailureConfig(max_failures=cfg.train.max_failures if own_process else 0),
            verbose=0,
        ),
    )
    with Heartbeat(storage, study_name, searcher.live_numbers):  # tells the trials' driver is alive
        grid = tuner.fit()
    errors = [r.error for r in grid if r.error is not None]
    if errors and len(errors) == len(grid):
        raise TLRayError(f"every trial failed; the first error: {str(errors[0]).splitlines()[-1]}")
