"""What a user sees: tl-ray's own lines on the terminal, Ray's output in OUTPUT/ray.log.

Each test runs the real `tl-ray` executable in a fresh process (its own embedded Ray), as a
user does, and reads stdout and stderr whole.
"""

from __future__ import annotations

import json
import re

from helpers import make_sentiment_rows, run_tl_ray, write_csv
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

SPACE = """
metric: val_loss
mode: min
params:
  train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
"""
# Ray's own output, none of which should reach a quiet terminal.
RAY_NOISE = re.compile(r"Traceback|pid=|\(raylet\)|\(autoscaler\)|Token authentication|WARNING|"
                       r"INFO|GetTimeoutError|Failed to send resource request|tensorboard --logdir /tmp/ray")  # fmt: skip


def _config(tmp_path, tiny_bert, **search):
    data = write_csv(tmp_path / "data.csv", make_sentiment_rows(64))
    path = tmp_path / "run.yaml"
    path.write_text(
        f"data: {{path: {data}, validation_split: 0.25}}\n"
        f"backbone: {{kind: hf-text, name_or_path: {tiny_bert}, pooling: mean}}\n"
        "train: {epochs: 2, batch_size: 16, max_length: 16}\n"
        f"search: {json.dumps({'trials': 2, 'max_concurrent_trials': 1, **search})}\n"
        f"output: {tmp_path / 'out'}\n",
        encoding="utf-8",
    )
    (tmp_path / "space.yaml").write_text(SPACE, encoding="utf-8")
    return path


def test_tune_prints_only_tl_rays_lines_and_logs_ray_to_the_experiment_folder(tiny_bert, tmp_path):
    config = _config(tmp_path, tiny_bert)
    done = run_tl_ray("tune", config, "--space", tmp_path / "space.yaml", cwd=tmp_path, timeout=400, check=True)
    lines = done.stderr.splitlines()
    assert lines[0].startswith("searching 2 trials, 1 at a time")
    assert lines[1] == f"curves: tensorboard --logdir {tmp_path / 'out' / 'tensorboard'}"
    assert sum(bool(re.fullmatch(r"trial \d epoch \d: val_loss \d\.\d{4} \| best .*", line)) for line in lines) == 4
    assert sum(" finished | best " in line for line in lines) == 2
    noise = [line for line in lines if RAY_NOISE.search(line)]
    assert not noise, noise
    assert json.loads(done.stdout.splitlines()[-1])["trials"] == 2  # stdout: the result only
    log = (tmp_path / "out" / "ray.log").read_text(encoding="utf-8")
    assert log.startswith("--- tl-ray tune ")  # Ray's lines (if any) went here, not to the terminal


def test_train_prints_one_line_per_epoch_and_verbose_shows_rays_logs_live(tiny_bert, tmp_path):
    config = _config(tmp_path, tiny_bert)
    quiet = run_tl_ray("train", config, cwd=tmp_path, timeout=400, check=True)
    lines = quiet.stderr.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("epoch")] == ["epoch 1", "epoch 2"]
    assert not [line for line in lines if RAY_NOISE.search(line)]
    log = (tmp_path / "out" / "ray.log").read_text(encoding="utf-8")
    assert "(RayTrainWorker pid=" in log and "(TrainController pid=" in log  # the workers' output
    run = next((tmp_path / "out" / "tensorboard").iterdir())  # `tl-ray train` curves too
    events = EventAccumulator(str(run))
    events.Reload()
    assert [e.step for e in events.Scalars("val_accuracy")] == [1, 2]

    loud = run_tl_ray("train", config, "--set", f"output={tmp_path / 'loud'}", "--verbose", cwd=tmp_path,
                      timeout=400, check=True)
    assert "(RayTrainWorker pid=" in loud.stderr  # live, as Ray prints it
    assert sum(line.startswith("epoch ") for line in loud.stderr.splitlines()) == 2
