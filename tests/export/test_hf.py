"""`tl-ray export --format hf`: a transformers folder that pipelines load with tl-ray's
labels and scores (fine-tuned and LoRA-merged [CLS]-pooler models); mean pooling refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import cli_lines

from tl_ray.serve.predictor import Predictor


@pytest.fixture(scope="module")
def exported(hf_folders, tmp_path_factory):
    """name -> (model folder, export folder, the command's JSON line), exported once."""
    done: dict[str, tuple] = {}

    def get(name: str) -> tuple:
        if name not in done:
            source = hf_folders(name)
            out = tmp_path_factory.mktemp(f"{name}-hf") / "hf"
            (line,) = cli_lines("export", source, "--format", "hf", "--out", out)
            done[name] = (source, out, line)
        return done[name]

    return get


@pytest.mark.parametrize("name", ["finetune", "lora"])
def test_pipeline_gives_tl_rays_labels_and_scores(exported, texts, name):
    from transformers import pipeline

    source, out, line = exported(name)
    classify = pipeline("text-classification", model=str(out), top_k=None, device="cpu")
    for text, got, want in zip(texts, classify(texts), Predictor(source, device="cpu").predict(texts)):
        scores = {row["label"]: row["score"] for row in got}
        assert set(scores) == set(want["probabilities"]), text
        for label, probability in want["probabilities"].items():
            assert abs(scores[label] - probability) < 1e-5, (text, label)
        assert got[0]["label"] == want["label"]  # the pipeline puts the best first


@pytest.mark.parametrize("name", ["finetune", "lora"])
def test_from_pretrained_logits_match_the_predictors_scores(exported, texts, name):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source, out, line = exported(name)
    model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.id2label == {0: "neg", 1: "pos", 2: "mixed"}
    assert model.config.label2id == {"neg": 0, "pos": 1, "mixed": 2}
    assert tokenizer.model_max_length == 48  # the checkpoint's max_length
    with torch.no_grad():
        logits = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.numpy()
    np.testing.assert_allclose(logits, Predictor(source, device="cpu").scores(texts), rtol=0, atol=1e-4)
    if name == "lora":  # merged: a plain model, no adapter files
        assert not any("lora" in key for key in model.state_dict())
        assert "adapter_config.json" not in line["files"]


def test_the_command_prints_one_json_line(exported):
    source, out, line = exported("finetune")
    assert line["format"] == "hf" and line["model"] == str(source) and line["out"] == str(out)
    assert line["files"] == sorted(p.name for p in out.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(line["files"])
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_mean_pooling_is_refused_naming_onnx(hf_folders, export_cli, tmp_path):
    code, _, err = export_cli(hf_folders("mean"), "--format", "hf", "--out", tmp_path / "hf")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "pools by mean" in lines[0] and "--format onnx" in lines[0]
    assert list(tmp_path.iterdir()) == []  # nothing written, no temp left


def _tiny_encoder(folder, tiny_bert: str, model_type: str):
    """A 1-layer encoder of `model_type` with MiniLM's (BERT) tokenizer, saved like a hub model."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    config = AutoConfig.for_model(model_type, vocab_size=30522, hidden_size=16, dim=16,
                                  num_hidden_layers=1, n_layers=1, num_attention_heads=2, n_heads=2,
                                  intermediate_size=32, hidden_dim=32, max_position_embeddings=64,
                                  type_vocab_size=2)  # fmt: skip
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("model_type, message", [
    ("distilbert", "classifies the raw [CLS] hidden state (DistilBertModel has no pooler)"),
    ("roberta", "RobertaForSequenceClassification puts a different head on roberta models"),
])  # fmt: skip
def test_a_head_no_transformers_class_reproduces_is_refused(
    tiny_bert, export_cli, write_model, tmp_path, model_type, message
):
    from tl_ray.backbones.registry import get_backbone
    from tl_ray.config import HFTextConfig

    encoder = _tiny_encoder(tmp_path / model_type, tiny_bert, model_type)
    backbone = get_backbone(HFTextConfig(name_or_path=str(encoder), pooling="cls"))
    source = write_model(tmp_path / "model", backbone, backbone.build(3), max_length=32)
    code, _, err = export_cli(source, "--format", "hf", "--out", tmp_path / "hf")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0] and "--format onnx" in lines[0], err
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.*"))
