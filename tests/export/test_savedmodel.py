"""`tl-ray export --format savedmodel`: a TensorFlow SavedModel that serves the Keras logits
from raw uint8 pixels (preprocessing in the graph), and the refusals between formats."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from image_helpers import digits, png_bytes

from tl_ray.serve.predictor import Predictor

pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def exported(keras_folder, tmp_path_factory):
    """(export folder, the command's JSON line, seconds the export took), exported once."""
    from tl_ray.cli.app import main

    out = tmp_path_factory.mktemp("savedmodel") / "1"
    start = time.perf_counter()
    code = main(["export", str(keras_folder), "--format", "savedmodel", "--out", str(out)])
    return out, code, time.perf_counter() - start


@pytest.fixture(scope="module")
def pixels_and_scores(keras_folder):
    """Digits as a client sends them (decoded, resized, uint8) and the Predictor's scores."""
    from tl_ray.images import read_images

    images = [png_bytes(pixels) for pixels, _ in digits((0, 1, 2), 2)]
    pixels = read_images(images, 32)
    assert pixels.dtype == np.uint8 and pixels.shape == (6, 32, 32, 3)
    return pixels, Predictor(keras_folder, device="cpu").scores(images)


def test_saved_model_serves_the_predictors_logits_from_raw_pixels(exported, pixels_and_scores):
    import tensorflow as tf

    from tl_ray.backbones.keras_image import _application

    (out, code, _), (pixels, expected) = exported, pixels_and_scores
    assert code == 0
    served = tf.saved_model.load(str(out))
    serve = served.signatures["serving_default"]
    assert serve.structured_input_signature[1]["pixels"].dtype == tf.uint8
    logits = serve(pixels=tf.constant(pixels))["logits"].numpy()
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)
    images = _application("MobileNetV2")[1](pixels.astype(np.float32))  # preprocessed by hand
    preprocessed = served.signatures["preprocessed"](images=tf.constant(images))["logits"].numpy()
    np.testing.assert_allclose(preprocessed, expected, rtol=0, atol=1e-4)
    assert [label.decode() for label in served.labels.numpy()] == ["neg", "pos", "mixed"]


def test_plain_tensorflow_serves_it_without_tl_ray_or_tf_keras(exported, pixels_and_scores, tmp_path):
    (out, _, _), (pixels, expected) = exported, pixels_and_scores
    np.save(tmp_path / "pixels.npy", pixels)
    script = ("import sys, numpy as np, tensorflow as tf; "
              "serve = tf.saved_model.load(sys.argv[1]).signatures['serving_default']; "
              "np.save(sys.argv[3], serve(pixels=tf.constant(np.load(sys.argv[2])))['logits'].numpy()); "
              "assert 'tl_ray' not in sys.modules and 'tf_keras' not in sys.modules")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "pixels.npy"),
                             str(tmp_path / "logits.npy")], capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), expected, rtol=0, atol=1e-4)


def test_the_folder_is_a_saved_model_with_its_labels(keras_folder, exported):
    import tensorflow as tf

    out, code, seconds = exported
    assert code == 0 and tf.saved_model.contains_saved_model(str(out))
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"saved_model.pb", "labels.json", "variables/variables.index"} <= files
    assert json.loads((out / "labels.json").read_text(encoding="utf-8"))["labels"] == ["neg", "pos", "mixed"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    print(f"savedmodel export took {seconds:.1f} s")


@pytest.mark.parametrize("fmt", ["hf", "onnx"])
def test_a_keras_model_is_refused_for_torch_formats_naming_savedmodel(keras_folder, export_cli, tmp_path, fmt):
    code, _, err = export_cli(keras_folder, "--format", fmt, "--out", tmp_path / "out")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].endswith("use --format savedmodel"), err
    assert list(tmp_path.iterdir()) == []


def test_a_text_model_is_refused_for_savedmodel_naming_hf_and_onnx(hf_folders, export_cli, tmp_path):
    code, _, err = export_cli(hf_folders("finetune"), "--format", "savedmodel", "--out", tmp_path / "x")
    assert code == 2 and err.strip().endswith("holds a hf-text model: use --format hf or onnx"), err
