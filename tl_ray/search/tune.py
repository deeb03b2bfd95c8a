"""Ray Tune + Optuna search: each trial is one Ray Train run; the study lives in Optuna storage.

Experiment folder (`output` of the run config):
    search.json      the base config, space and options, so `--resume` needs only the folder
    study.db         the Optuna study (unless search.storage names another SQLAlchemy URL)
    tune_<time>/     Ray Tune's folders, one per launch (first run and each resume)
    trials/<id>/     each trial's Ray Train run and its checkpoints
    trials.parquet   every trial's parameters and per-epoch metrics
    best.json        the best trial; its model is exported to model/

Example:
    >>> summary = run_search(load_config("run.yaml"), load_space("search_spaces/minilm-sentiment.yaml"))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from tl_ray.backbones.registry import get_backbone
from tl_ray.config import RunConfig, SearchConfig, apply_overrides, parse_config
from tl_ray.data import Datasets, load_datasets
from tl_ray.errors import ConfigError, TLRayError
from tl_ray.io import write_json_atomic
from tl_ray.search.progress import SearchProgress
from tl_ray.search.results import BEST_FILE, export_results
from tl_ray.search.space import SearchSpace, flatten, parse_space, to_overrides, validate_against
from tl_ray.storage import check_reachable, fetch_checkpoint, is_uri, storage_location
from tl_ray.train.checkpoint import export_model_folder
from tl_ray.train.driver import build_trainer, ensure_ray

__all__ = ["SEARCH_FILE", "STUDY_NAME", "max_concurrent_trials", "resume_search", "run_search"]

SEARCH_FILE = "search.json"
STUDY_NAME = "tl-ray"
TRIAL_KEY = "optuna_trial"
# The trial function only launches its Train run, whose workers hold the CPUs. It asks for a
# little logical memory and no CPU, so N trials of W workers fit exactly on N x W CPUs.
TRIAL_DRIVER_RESOURCES = {"memory": 64 * 1024**2}  # the Optuna trial number, carried in each Tune trial's config


def _sampler(options: SearchConfig):
    """A fixed mapping from the config's sampler name to an Optuna sampler."""
    import optuna

    seed = options.seed
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


def _trial(
    params: dict[str, Any], *, base: dict[str, Any], datasets: Datasets, trials_dir: str, cache_dir: str
) -> None:
    """One Tune trial: apply the sampled overrides and run Ray Train, reporting to Tune."""
    sampled = {k: v for k, v in params.items() if k != TRIAL_KEY}
    cfg = parse_config(apply_overrides(base, to_overrides(sampled)))
    trainer = build_trainer(
        cfg,
        datasets,
        storage_path=trials_dir,
        name=tune.get_context().get_trial_id(),
        callbacks=[TuneReportCallback()],
        cache_dir=Path(cache_dir),  # shared by trials with the same boundary
    )
    trainer.fit()


@dataclass(frozen=True)
class _DefineByRun:
    """Optuna define-by-run space (a picklable callable: Tune checkpoints its searcher)."""

    space: SearchSpace
    fixed: dict[str, Any]

    def __call__(self, trial) -> dict[str, Any]:
        self.space.sample(trial, self.fixed)
        return {TRIAL_KEY: trial.number}


def _storage_url(cfg: RunConfig, folder: Path) -> str:
    return cfg.search.storage or f"sqlite:///{folder / 'study.db'}"


def _open_study(url: str, mode: str):
    import optuna

    direction = "maximize" if mode == "max" else "minimize"
    try:
        storage = optuna.storages.RDBStorage(url)
    except Exception as error:  # SQLAlchemy raises many types for a bad URL
        raise ConfigError(f"search.storage: cannot open {url!r}: {str(error).splitlines()[0]}") from None
    study = optuna.create_study(
        storage=storage, study_name=STUDY_NAME, direction=direction, load_if_exists=True
    )
    return storage, study


def _finished_and_interrupted(study) -> tuple[int, int]:
    """Count trials already done; trials left RUNNING by an interruption become FAIL."""
    from optuna.trial import TrialState

    interrupted = 0
    for trial in study.get_trials(deepcopy=False):
        if trial.state == TrialState.RUNNING:
            study._storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            interrupted += 1
    done = sum(
        1
        for t in study.get_trials(deepcopy=False)
        if t.state == TrialState.COMPLETE
        or (t.state == TrialState.FAIL and not t.user_attrs.get("interrupted"))
    )
    return done, interrupted


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
    ensure_ray(address)
    max_concurrent_trials(cfg, ray.cluster_resources())  # can the cluster hold one trial?
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        folder / SEARCH_FILE,
        {"config": cfg.model_dump(), "space": space.to_dict(), "created": time.time()},
    )
    return _launch(cfg, space, folder, address=address, echo=echo)


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
    return _launch(cfg, parse_space(saved["space"]), folder, address=address, echo=echo)


def _launch(cfg: RunConfig, space: SearchSpace, folder: Path, *, address, echo) -> dict[str, Any]:
    options = cfg.search
    storage, study = _open_study(_storage_url(cfg, folder), space.mode)
    done, interrupted = _finished_and_interrupted(study)
    remaining = options.trials - done
    if interrupted:
        echo(f"resuming: {done} trials finished, {interrupted} interrupted (will be re-sampled)")
    if remaining > 0:
        datasets = load_datasets(cfg.data, seed=cfg.train.seed)
        ensure_ray(address)
        check_reachable(_trials_location(cfg, folder))  # every node writes checkpoints there
        _run_tuner(cfg, space, folder, storage, remaining, datasets, echo)
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


def _run_tuner(cfg, space, folder, storage, remaining, datasets, echo) -> None:
    options = cfg.search
    concurrency = min(max_concurrent_trials(cfg, ray.cluster_resources()), remaining)
    searcher = OptunaSearch(
        space=_DefineByRun(space, flatten(cfg.model_dump())),
        metric=space.metric,
        mode=space.mode,
        sampler=_sampler(options),
        study_name=STUDY_NAME,
        storage=storage,
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
    echo(f"searching {remaining} trials, {concurrency} at a time, sampler {options.sampler}")
    trainable = tune.with_parameters(
        _trial,
        base=cfg.model_dump(),
        datasets=datasets,
        trials_dir=_trials_location(cfg, folder),  # may be a URI (storage_path)
        cache_dir=str(folder / "cache"),
    )
    tuner = tune.Tuner(
        tune.with_resources(trainable, TRIAL_DRIVER_RESOURCES),
        tune_config=tune.TuneConfig(
            metric=space.metric,
            mode=space.mode,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=remaining,
            max_concurrent_trials=concurrency,
        ),
        run_config=tune.RunConfig(
            name=time.strftime("tune_%Y-%m-%d_%H-%M-%S"),
            storage_path=str(folder),
            callbacks=[SearchProgress(space.metric, space.mode, cfg.train.epochs, echo)],
            verbose=0,
        ),
    )
    grid = tuner.fit()
    errors = [r.error for r in grid if r.error is not None]
    if errors and len(errors) == len(grid):
        raise TLRayError(f"every trial failed; the first error: {str(errors[0]).splitlines()[-1]}")
