"""keras-image end to end on the shared Ray: `tl-ray train` (TensorflowTrainer, 2 workers,
MultiWorkerMirroredStrategy, both phases), `tl-ray predict --image`, and the Serve endpoint
with base64 and multipart images. Tiny: 3 digit classes x 20 images at 32x32, MobileNetV2
alpha 0.35, 2 epochs.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import free_port, run_cli
from image_helpers import digits, png_bytes, write_image_folder

from tl_ray.train.checkpoint import read_manifest

# TensorFlow starts in the driver, two workers and a Serve replica: about 6 min on 2 shared,
# busy cores (measured under contention), so `make test-fast` skips it.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_session) -> dict:
    root = tmp_path_factory.mktemp("keras-train")
    write_image_folder(root / "digits", digits((0, 1, 2), 20))
    config = root / "run.yaml"
    config.write_text(
        f"data: {{path: {root / 'digits'}, validation_split: 0.25}}\n"
        "backbone: {kind: keras-image, architecture: MobileNetV2, alpha: 0.35, image_size: 32,\n"
        "           unfreeze_depth: 2, head_epochs: 1, head_lr: 0.01, finetune_lr: 0.001}\n"
        "train: {epochs: 2, batch_size: 8, num_workers: 2, keep_checkpoints: 2, max_failures: 0}\n"
        f"output: {root / 'out'}\n",
        encoding="utf-8",
    )
    started = time.perf_counter()
    code, lines = run_cli(["train", str(config)])
    assert code == 0
    return {"root": root, "result": lines[-1], "seconds": time.perf_counter() - started}


def test_train_cli_runs_both_phases_on_two_workers(trained):
    result, root = trained["result"], trained["root"]
    assert result["metrics"]["val_count"] == 15  # exact: the whole validation set, once
    manifests = sorted(
        (read_manifest(p.parent) for p in (root / "out").glob("train_*/checkpoint_*/manifest.json")),
        key=lambda m: m["epoch"],
    )
    assert [(m["epoch"], m["metrics"]["phase"], m["metrics"]["lr"]) for m in manifests] == [
        (1, 1, 0.01), (2, 2, 0.001)]
    exported = read_manifest(result["model"])
    assert exported["backbone"]["kind"] == "keras-image" and exported["image_size"] == 32
    assert (Path(result["model"]) / "model.keras").is_file()
    assert all(np.isfinite(m["metrics"]["train_loss"]) for m in manifests)


def test_predict_image_cli_prints_label_and_probabilities(trained, tmp_path):
    files = []
    for i, (pixels, _) in enumerate(digits((0, 2), 1, seed=5)):
        files.append(tmp_path / f"{i}.png")
        files[-1].write_bytes(png_bytes(pixels))
    code, lines = run_cli(["predict", trained["result"]["model"], *[f"--image={f}" for f in files]])
    assert code == 0 and [line["image"] for line in lines] == [str(f) for f in files]
    for line in lines:
        assert line["label"] in ("0", "1", "2") and abs(sum(line["probabilities"].values()) - 1) < 1e-6
    (tmp_path / "bad.png").write_bytes(b"nope")
    assert run_cli(["predict", trained["result"]["model"], "--image", str(tmp_path / "bad.png")])[0] == 2
    assert run_cli(["predict", trained["result"]["model"], "--text", "a film"])[0] == 2



def test_serve_answers_base64_and_multipart_images(trained):
    from ray import serve

    from tl_ray.serve.app import build_app
    from tl_ray.serve.predictor import Predictor

    model = trained["result"]["model"]
    pngs = [png_bytes(pixels) for pixels, _ in digits((0, 1, 2), 1, seed=9)]
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({"model": model, "num_cpus": 0.25, "max_replicas": 1}),
                  name="keras", route_prefix="/keras", blocking=False)
        deadline = time.monotonic() + 120
        while serve.status().applications["keras"].status != "RUNNING":
            assert time.monotonic() < deadline, "the keras app did not start in 120 s"
            time.sleep(0.5)
        url = f"http://127.0.0.1:{port}/keras/v1/predict"
        body = {"images": [base64.b64encode(data).decode() for data in pngs]}
        answer = httpx.post(url, json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        expected = Predictor(model).predict(pngs)
        got = answer.json()["predictions"]
        assert [p["label"] for p in got] == [p["label"] for p in expected]
        assert np.allclose([p["score"] for p in got], [p["score"] for p in expected], atol=1e-5)
        files = [("image", (f"{i}.png", data, "image/png")) for i, data in enumerate(pngs)]
        multipart = httpx.post(url, files=files, timeout=60)
        assert multipart.status_code == 200, multipart.text
        by_upload = multipart.json()["predictions"]
        assert [p["label"] for p in by_upload] == [p["label"] for p in got]
        assert np.allclose([p["score"] for p in by_upload], [p["score"] for p in got], atol=1e-5)
        for bad, message in [({"images": ["%%%"]}, "images[0] is not valid base64"),
                             ({"images": [base64.b64encode(b"xx").decode()]}, "images[0]: cannot decode"),
                             ({"texts": ["a film"]}, "this model classifies images")]:
            refused = httpx.post(url, json=bad, timeout=60)
            assert refused.status_code == 422 and message in refused.json()["detail"], refused.text
    finally:
        serve.shutdown()


def test_evaluate_cli_scores_an_image_folder(trained):
    from tl_ray.images import read_image_folder
    from tl_ray.serve.predictor import Predictor

    folder = trained["root"] / "digits"
    code, (line,) = run_cli(["evaluate", trained["result"]["model"], "--data", str(folder)])
    assert code == 0 and line["count"] == 60
    table = read_image_folder(folder)
    answers = Predictor(trained["result"]["model"]).predict(table["image"].to_pylist())
    right = sum(a["label"] == label for a, label in zip(answers, table["label"].to_pylist()))
    assert line["accuracy"] == pytest.approx(right / 60)


def test_one_worker_keras_search_trains_in_the_trials_own_process(trained, tmp_path):
    """In-process trials of a keras-image search: TensorFlow's default strategy (no TF_CONFIG),
    two trials in turn in one reused trial process, both phases, checkpoints as a Train run's."""
    space = tmp_path / "space.yaml"
    space.write_text("metric: val_accuracy\nmode: max\nparams:\n"
                     "  backbone.finetune_lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n")  # fmt: skip
    config = tmp_path / "run.yaml"
    config.write_text(
        f"data: {{path: {trained['root'] / 'digits'}, validation_split: 0.25}}\n"
        "backbone: {kind: keras-image, architecture: MobileNetV2, alpha: 0.35, image_size: 32,\n"
        "           unfreeze_depth: 2, head_epochs: 1, head_lr: 0.01}\n"
        "train: {epochs: 2, batch_size: 8, num_workers: 1}\n"
        "search: {trials: 2, sampler: random, early_stopping: false, max_concurrent_trials: 1}\n"
        f"output: {tmp_path / 'search'}\n",
        encoding="utf-8",
    )
    code, lines = run_cli(["tune", str(config), "--space", str(space)])
    assert code == 0 and lines[-1]["trials"] == 2
    results = [json.loads(line) for path in (tmp_path / "search").glob("tune_*/*/result.json")
               for line in path.read_text().splitlines() if line.strip()]  # fmt: skip
    assert sorted((r["config"]["optuna_trial"], r["epoch"], r["phase"]) for r in results) == [
        (0, 1, 1), (0, 2, 2), (1, 1, 1), (1, 2, 2)]
    assert all(r["worker_pid"] == r["pid"] for r in results)
    assert len({r["pid"] for r in results}) == 1  # the second trial reused the first's process
    assert read_manifest(lines[-1]["model"])["backbone"]["kind"] == "keras-image"
