"""`tl-ray export --format onnx`: a folder that onnxruntime and the saved tokenizer run alone."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tl_ray.serve.predictor import Predictor

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.mark.parametrize("name", ["finetune", "mean"])
def test_onnxruntime_with_the_saved_tokenizer_gives_the_predictors_scores(
    hf_folders, export_cli, tmp_path, texts, name
):
    import onnxruntime as ort
    from transformers import AutoTokenizer

    source = hf_folders(name)
    code, line, err = export_cli(source, "--format", "onnx", "--out", tmp_path / "onnx")
    assert code == 0, err
    out = tmp_path / "onnx"
    assert line == {"format": "onnx", "model": str(source), "out": str(out),
                    "files": sorted(p.name for p in out.iterdir())}  # fmt: skip
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=48, return_tensors="np")
    wanted = {i.name for i in session.get_inputs()}
    logits = session.run(["logits"], {k: v.astype(np.int64) for k, v in encoded.items() if k in wanted})[0]
    np.testing.assert_allclose(logits, Predictor(source, device="cpu").scores(texts), rtol=0, atol=1e-4)


def test_word_vectors_and_int8_through_the_command(wv_folder, export_cli, tmp_path, texts):
    out = tmp_path / "onnx-int8"
    code, line, err = export_cli(wv_folder, "--format", "onnx", "--quantize", "int8", "--out", out)
    assert code == 0, err
    assert {"model.onnx", "labels.json", "manifest.json", "word_vectors.json"} <= set(line["files"])
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["onnx"]["quantization"] == "dynamic-int8"
    predictor = Predictor(out, runtime="onnx-int8")
    assert [p["label"] for p in predictor.predict(texts)] and predictor.scores(texts).shape == (5, 3)


def test_an_existing_export_is_replaced_only_with_force(hf_folders, export_cli, tmp_path):
    source, out = hf_folders("finetune"), tmp_path / "onnx"
    out.mkdir()
    (out / "notes.txt").write_text("keep me", encoding="utf-8")
    code, _, err = export_cli(source, "--format", "onnx", "--out", out)
    assert code == 2 and "pass --force" in err and (out / "notes.txt").is_file()
    code, line, err = export_cli(source, "--format", "onnx", "--out", out, "--force")
    assert code == 0, err
    assert "notes.txt" not in line["files"] and (out / "model.onnx").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
