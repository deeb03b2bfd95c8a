"""Trial curves read back by the ecosystem's own readers: TensorBoard's EventAccumulator and
MLflow's search_runs, after a real search; MLflow's local file store; one-line failures."""

from __future__ import annotations

import json
import types

import pyarrow.parquet as pq
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import make_sentiment_rows, write_csv
from tl_ray.errors import TLRayError
from tl_ray.search.tracking import MLflowTrials, open_mlflow
from tl_ray.train.events import EpochWriter

mlflow = pytest.importorskip("mlflow")

SPACE = """
metric: val_accuracy
mode: max
params:
  train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
  backbone.unfreeze_depth: {type: int, low: 0, high: 2}
"""


def _curves(logdir) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(logdir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def search(ray_session, tiny_bert, tmp_path_factory):
    from tl_ray.cli.app import main

    tmp = tmp_path_factory.mktemp("tracking")
    data = write_csv(tmp / "data.csv", make_sentiment_rows(96))
    (tmp / "space.yaml").write_text(SPACE, encoding="utf-8")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    (tmp / "run.yaml").write_text(
        f"data: {{path: {data}, validation_split: 0.25}}\n"
        f"backbone: {{kind: hf-text, name_or_path: {tiny_bert}, pooling: mean}}\n"
        "train: {epochs: 2, batch_size: 16, max_length: 16}\n"
        f"search: {{trials: 3, seed: 1, early_stopping: false, max_concurrent_trials: 2, mlflow_uri: '{uri}', "
        "mlflow_experiment: tracked}\n"
        f"output: {tmp / 'search'}\n",
        encoding="utf-8",
    )
    assert main(["tune", str(tmp / "run.yaml"), "--space", str(tmp / "space.yaml")]) == 0
    rows = pq.read_table(tmp / "search" / "trials.parquet").to_pylist()
    return tmp / "search", uri, rows


def test_every_trial_has_its_epochs_in_tensorboard(search):
    folder, _, rows = search
    for trial in sorted({row["trial"] for row in rows}):
        curves = _curves(folder / "tensorboard" / f"trial_{trial:03d}")
        mine = sorted((row["epoch"], row["val_accuracy"]) for row in rows if row["trial"] == trial)
        assert [(step, pytest.approx(value)) for step, value in curves["val_accuracy"]] == mine
        assert {"train_loss", "val_loss", "val_f1", "lr"} <= set(curves)


def test_tensorboard_holds_each_trials_parameters_for_the_hparams_dashboard(search):
    folder, _, rows = search
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(folder / "tensorboard" / "trial_000"))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    params = json.loads(next(row["params"] for row in rows if row["trial"] == 0))
    assert start.hparams["train.lr"].number_value == pytest.approx(params["train.lr"])
    assert start.hparams["backbone.unfreeze_depth"].number_value == params["backbone.unfreeze_depth"]


def test_mlflow_has_one_run_per_trial_with_its_params_and_epochs(search):
    folder, uri, rows = search
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tracked")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == len({row["trial"] for row in rows}) == 3
    for run in runs:
        trial = int(run.data.tags["tl_ray.trial"])
        assert run.info.run_name == f"trial {trial}" and run.info.status == "FINISHED"
        params = json.loads(next(row["params"] for row in rows if row["trial"] == trial))
        assert {k: float(v) for k, v in run.data.params.items()} == pytest.approx(params)
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        mine = sorted((row["epoch"], row["val_accuracy"]) for row in rows if row["trial"] == trial)
        assert sorted((m.step, m.value) for m in history) == [(e, pytest.approx(v)) for e, v in mine]


def test_mlflow_search_runs_reads_the_tracking_uri(search):
    _, uri, _ = search
    mlflow.set_tracking_uri(uri)
    frame = mlflow.search_runs(experiment_names=["tracked"])
    assert len(frame) == 3 and "params.train.lr" in frame.columns and "metrics.val_accuracy" in frame.columns


def _trial(number: int, **config):
    return types.SimpleNamespace(trial_id=f"t{number}", config={"optuna_trial": number, **config})


def test_a_local_file_store_works_and_a_resumed_trial_continues_its_run(tmp_path):
    uri = str(tmp_path / "mlruns")  # a plain folder: MLflow's file store
    experiment = open_mlflow(uri, "files")
    callback = MLflowTrials(uri, experiment, study="s1")
    trial = _trial(0, **{"train.lr": 0.01})
    callback.on_trial_start(0, [], trial)
    callback.on_trial_result(0, [], trial, {"epoch": 1, "val_accuracy": 0.5, "val_loss": float("nan")})
    again = MLflowTrials(uri, experiment, study="s1")  # a resumed search: a new driver
    again.on_trial_result(0, [], _trial(0, **{"train.lr": 0.01}), {"epoch": 2, "val_accuracy": 0.75})
    again.on_trial_complete(0, [], _trial(0))
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([experiment])
    assert run.data.params == {"train.lr": "0.01"} and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.5), (2, 0.75)]
    assert client.get_metric_history(run.info.run_id, "val_loss") == []  # NaN is not logged


def test_a_bad_mlflow_uri_is_one_line(tmp_path):
    with pytest.raises(TLRayError, match=r"^cannot use MLflow at nosuch://x: ") as error:
        open_mlflow("nosuch://x", "e")
    assert "\n" not in str(error.value)


def test_epoch_writer_steps_are_epochs(tmp_path):
    writer = EpochWriter(tmp_path / "run", {"train.lr": 0.1}, "val_loss")
    for epoch, loss in [(1, 0.9), (2, 0.7), (3, float("inf"))]:
        writer.write({"epoch": epoch, "val_loss": loss, "status": "x"})
    writer.close()
    assert _curves(tmp_path / "run") == {"val_loss": [(1, pytest.approx(0.9)), (2, pytest.approx(0.7))]}
