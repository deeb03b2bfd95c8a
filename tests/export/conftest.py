"""Fixtures for the export tests: tiny model folders built without Ray, once per session.

hf-text folders use the 2-layer `tiny_bert` (cls pooling through BERT's pooler, LoRA, mean
pooling); the keras-image folder is MobileNetV2 (alpha 0.35, 32x32, random weights); the
word-vectors folder uses the session's `tiny_vectors` (FastText trained in a second).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
from helpers import run_cli

LABELS = ("neg", "pos", "mixed")
HF = {"finetune": {"pooling": "cls"}, "lora": {"pooling": "cls", "mode": "lora"},
      "mean": {"pooling": "mean"}}  # fmt: skip
# Different lengths (padding), an empty text and words no vocabulary holds.
TEXTS = ["A gripping, funny and thoroughly moving film.", "dull", "",
         "The plot is tedious and the story never finds its qzxvjk rhythm.", "great"]  # fmt: skip


def _write(folder: Path, backbone, model, **extra) -> Path:
    from tl_ray.data import LabelMap
    from tl_ray.train.checkpoint import write_model_folder

    folder.mkdir(parents=True)
    write_model_folder(folder, backbone, model, LabelMap(LABELS), metrics={}, epoch=1, extra=extra)
    return folder


@pytest.fixture(scope="session")
def write_model() -> Callable[..., Path]:
    """(folder, backbone, model, **manifest extras) -> a model folder with LABELS."""
    return _write


@pytest.fixture
def fake_model(tmp_path) -> Callable[..., Path]:
    """kind -> a folder with only a manifest: enough for the checks made before any load."""

    def make(kind: str, folder: Path | None = None) -> Path:
        folder = folder or tmp_path / f"fake-{kind}"
        folder.mkdir(parents=True, exist_ok=True)
        manifest = {"format_version": 1, "backbone": {"kind": kind}}
        (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
        return folder

    return make


@pytest.fixture(scope="session")
def texts() -> list[str]:
    return list(TEXTS)


def _hf_folder(folder: Path, tiny_bert: str, options: dict) -> Path:
    import torch

    from tl_ray.backbones.registry import get_backbone
    from tl_ray.config import HFTextConfig

    torch.manual_seed(3)
    backbone = get_backbone(HFTextConfig(name_or_path=tiny_bert, unfreeze_depth=1, **options))
    model = backbone.build(len(LABELS))
    with torch.no_grad():  # non-trivial adapters (LoRA B starts at zero), pooler and head
        for name, param in model.named_parameters():
            if "lora_B" in name or name.startswith("classifier.") or ".pooler." in name:
                param.add_(0.3 * torch.randn_like(param))
    return _write(folder, backbone, model, max_length=48)


@pytest.fixture(scope="session")
def hf_folders(tmp_path_factory, tiny_bert) -> Callable[[str], Path]:
    """name (a key of HF) -> an hf-text model folder, built on first use."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = _hf_folder(tmp_path_factory.mktemp(name) / "model", tiny_bert, HF[name])
        return built[name]

    return get


@pytest.fixture(scope="session")
def keras_folder(tmp_path_factory) -> Path:
    from tl_ray.backbones.registry import get_backbone
    from tl_ray.config import KerasImageConfig

    backbone = get_backbone(KerasImageConfig(architecture="MobileNetV2", alpha=0.35, image_size=32,
                                             weights=None))  # fmt: skip
    folder = tmp_path_factory.mktemp("keras") / "model"
    return _write(folder, backbone, backbone.build(len(LABELS)), image_size=32)


@pytest.fixture(scope="session")
def wv_folder(tmp_path_factory, tiny_vectors) -> Path:
    import torch

    from tl_ray.backbones.registry import get_backbone
    from tl_ray.config import WordVectorsConfig

    torch.manual_seed(3)
    backbone = get_backbone(WordVectorsConfig(vectors=tiny_vectors, encoder="cnn",
                                              cnn_filters=[2, 3], cnn_maps=4))  # fmt: skip
    root = tmp_path_factory.mktemp("wv")
    return _write(root / "model", backbone, backbone.build(len(LABELS)))


@pytest.fixture
def export_cli(capsys) -> Callable[..., tuple[int, dict | None, str]]:
    """argv -> (exit code, the JSON line on stdout or None, stderr) of `tl-ray export ...`."""

    def run(*argv: object) -> tuple[int, dict | None, str]:
        code, lines = run_cli(["export", *argv])
        assert code != 0 or len(lines) == 1, lines  # one JSON line on success
        return code, lines[0] if code == 0 else None, capsys.readouterr().err

    return run
