"""How a search's trials train: in the trial's own process (one worker), or a Ray Train run each."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from helpers import make_sentiment_rows, write_csv
from tl_ray.config import parse_config
from tl_ray.errors import ConfigError
from tl_ray.search.space import parse_space
from tl_ray.search.tune import in_process, run_search, trial_resources
from tl_ray.train.session import INDEX_FILE, TableShard

SPACE = {
    "metric": "val_accuracy",
    "mode": "max",
    "params": {
        "train.lr": {"type": "float", "low": 1.0e-4, "high": 3.0e-2, "log": True},
        "backbone.unfreeze_depth": {"type": "int", "low": 0, "high": 2},
    },
}


def _config(tmp_path, tiny_bert, data, **train):
    return parse_config({
        "data": {"path": str(data), "validation_split": 0.25},
        "backbone": {"kind": "hf-text", "name_or_path": tiny_bert, "pooling": "mean"},
        "train": {"epochs": 3, "batch_size": 16, "max_length": 32, **train},
        "search": {"trials": 4, "seed": 1, "reduction_factor": 2, "max_concurrent_trials": 2},
        "output": str(tmp_path / "search"),
    })


def _results(folder: Path) -> list[dict]:
    """Tune's own result.json lines: every report with the trial's pid."""
    return [json.loads(line) for path in folder.glob("tune_*/*/result.json")
            for line in path.read_text().splitlines() if line.strip()]  # fmt: skip


def test_auto_runs_one_worker_trials_in_process_and_more_as_train_runs():
    one = parse_config({"data": {"path": "x"}})
    two = parse_config({"data": {"path": "x"}, "train": {"num_workers": 2}})
    assert in_process(one) and not in_process(two)
    forced = parse_config({"data": {"path": "x"}, "search": {"trial_runner": "ray-train"}})
    assert not in_process(forced)
    bad = parse_config({"data": {"path": "x"}, "train": {"num_workers": 2}, "search": {"trial_runner": "in-process"}})
    with pytest.raises(ConfigError, match="in-process needs train.num_workers 1, not 2"):
        in_process(bad)


def test_an_in_process_trial_reserves_its_workers_resources_itself():
    """The concurrency cap counts worker slots: an in-process trial must hold one (its GPU
    too), while a trial that launches a Train run holds only memory (its workers hold CPUs)."""
    gpu = parse_config({"data": {"path": "x"}, "train": {"use_gpu": True, "cpus_per_worker": 4}})
    assert trial_resources(gpu) == {"CPU": 4, "GPU": 1}
    assert trial_resources(parse_config({"data": {"path": "x"}})) == {"CPU": 1}
    launcher = trial_resources(parse_config({"data": {"path": "x"}, "train": {"num_workers": 2}}))
    assert "CPU" not in launcher and "GPU" not in launcher


def test_table_shard_batches_like_ray_data_and_shuffles_the_whole_table():
    shard = TableShard(pa.table({"row": list(range(10)), "text": [f"t{i}" for i in range(10)]}))
    plain = [b["row"].tolist() for b in shard.iter_batches(batch_size=4)]
    assert plain == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    epoch1 = [r for b in shard.iter_batches(batch_size=4, local_shuffle_seed=1) for r in b["row"].tolist()]
    epoch2 = [r for b in shard.iter_batches(batch_size=4, local_shuffle_seed=2) for r in b["row"].tolist()]
    assert sorted(epoch1) == sorted(epoch2) == list(range(10)) and epoch1 != epoch2
    batch = next(shard.iter_batches(batch_size=3, local_shuffle_seed=1))
    assert [f"t{r}" for r in batch["row"]] == list(batch["text"])  # rows stay whole


def test_one_worker_trials_train_in_their_own_process(ray_session, tiny_bert, tmp_path):
    data = write_csv(tmp_path / "data.csv", make_sentiment_rows(240))
    best = run_search(_config(tmp_path, tiny_bert, data), parse_space(SPACE), echo=lambda line: None)
    folder = tmp_path / "search"
    results = [r for r in _results(folder) if "epoch" in r]
    assert results and all(r["worker_pid"] == r["pid"] for r in results)  # the loop ran in the trial
    per_trial: dict[int, list[int]] = {}
    for r in results:
        per_trial.setdefault(r["config"]["optuna_trial"], []).append(r["epoch"])
    assert len(per_trial) == 4 and all(epochs == sorted(epochs) for epochs in per_trial.values())
    assert min(max(e) for e in per_trial.values()) < 3 and best["pruned"] >= 1  # ASHA stopped one
    for run in (folder / "trials").iterdir():  # a Train run's layout: checkpoints under its name
        index = json.loads((run / INDEX_FILE).read_text())["checkpoints"]
        assert 1 <= len(index) <= 2 and all((run / e["name"] / "manifest.json").is_file() for e in index)
    assert best["model"] == str(folder / "model") and Path(best["checkpoint"]).is_dir()


def test_two_worker_trials_still_run_ray_train_worker_groups(ray_session, tiny_bert, tmp_path):
    data = write_csv(tmp_path / "data.csv", make_sentiment_rows(160))
    cfg = _config(tmp_path, tiny_bert, data, epochs=1, num_workers=2)
    cfg = cfg.model_copy(update={"search": cfg.search.model_copy(update={"trials": 1})})
    best = run_search(cfg, parse_space(SPACE), echo=lambda line: None)
    results = [r for r in _results(tmp_path / "search") if "epoch" in r]
    assert results and all(r["worker_pid"] != r["pid"] for r in results)  # a Train worker trained
    assert not list((tmp_path / "search" / "trials").glob(f"*/{INDEX_FILE}"))
    assert best["model"]
