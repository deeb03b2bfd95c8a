"""What serving loads: a tl-ray model folder and nothing else, weights from safetensors only.

Anything else named as a model (a missing path, a file, a folder without tl-ray's manifest or
labels, a path with `..`, pickle-format weights) is refused in one line before any weight is
read, by `Predictor` and by a replica's swap (`_load`, `_slot`); a pickled payload never runs.
Over real Serve (the old model keeps serving): tests/serve/test_app.py.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from tl_ray.errors import CheckpointError, ConfigError, TLRayError
from tl_ray.serve.api import ModelSlot, ServeArgs, one_line
from tl_ray.serve.predictor import Predictor, check_model_folder


class Exploit:
    """A pickle that, once loaded, writes the file named in `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "the payload ran"))


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_bert) -> Path:
    import torch

    from tl_ray.backbones.registry import get_backbone
    from tl_ray.config import HFTextConfig
    from tl_ray.data import LabelMap
    from tl_ray.train.checkpoint import write_model_folder

    torch.manual_seed(0)
    backbone = get_backbone(HFTextConfig(name_or_path=tiny_bert, unfreeze_depth=1))
    folder = tmp_path_factory.mktemp("model-folder") / "model"
    folder.mkdir()
    write_model_folder(folder, backbone, backbone.build(2), LabelMap(("neg", "pos")), metrics={},
                       epoch=1)  # fmt: skip
    return folder


def _copy(model: Path, target: Path) -> Path:
    return Path(shutil.copytree(model, target))


def _not_models(model: Path, root: Path) -> dict[str, tuple[Path | str, str]]:
    """Name -> (path, what the refusal says) for things that are not a model folder."""
    no_manifest = _copy(model, root / "no-manifest")
    (no_manifest / "manifest.json").unlink()
    listed = _copy(model, root / "list-manifest")
    (listed / "manifest.json").write_text("[1, 2]", encoding="utf-8")
    kindless = _copy(model, root / "kindless")
    manifest = json.loads((kindless / "manifest.json").read_text(encoding="utf-8"))
    del manifest["backbone"]
    (kindless / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    no_labels = _copy(model, root / "no-labels")
    (no_labels / "labels.json").unlink()
    (root / "empty").mkdir()
    return {
        "missing": (root / "missing", "checkpoint folder not found"),
        "file": (model / "manifest.json", "is a file, not a tl-ray model folder"),
        "empty": (root / "empty", "is not a tl-ray checkpoint: it has no manifest.json"),
        "no-manifest": (no_manifest, "it has no manifest.json"),
        "list-manifest": (listed, "manifest.json is not a JSON object"),
        "kindless": (kindless, "names no backbone kind"),
        "no-labels": (no_labels, "it has no labels.json"),
        "dot-dot": (f"{model}/../{model.name}", "has a '..' part; name the model folder itself"),
        "empty-path": ("", "the model path must name a tl-ray model folder"),
    }


def test_anything_but_a_model_folder_is_refused_in_one_line(model, tmp_path):
    assert check_model_folder(model) == model
    for name, (path, message) in _not_models(model, tmp_path).items():
        with pytest.raises(CheckpointError) as caught:
            check_model_folder(path)
        assert message in str(caught.value) and "\n" not in str(caught.value), (name, caught.value)
        with pytest.raises(CheckpointError, match="model|folder|checkpoint"):
            Predictor(path)


def _pickled(model: Path, root: Path, marker: Path) -> dict[str, Path]:
    """Copies of `model` whose weights are a pickled payload, under names loaders know."""
    payload = pickle.dumps({"state": Exploit(marker)})
    bin_weights = _copy(model, root / "pytorch-bin")
    (bin_weights / "model.safetensors").unlink()
    (bin_weights / "pytorch_model.bin").write_bytes(payload)
    beside = _copy(model, root / "beside")  # safetensors present, a pickle next to them
    (beside / "adapter_model.bin").write_bytes(payload)
    disguised = _copy(model, root / "disguised")  # a pickle under the safetensors name
    (disguised / "model.safetensors").write_bytes(payload)
    head = _copy(model, root / "head")
    for weights in head.glob("*.safetensors"):
        if weights.name != "model.safetensors":
            weights.write_bytes(payload)
    return {"pytorch-bin": bin_weights, "beside": beside, "disguised": disguised, "head": head}


def test_a_pickled_payload_is_refused_and_never_runs(model, tmp_path):
    marker = tmp_path / "payload-ran"
    folders = _pickled(model, tmp_path, marker)
    for name in ("pytorch-bin", "beside"):
        with pytest.raises(CheckpointError, match="holds pickle-format weights .*safetensors") as caught:
            Predictor(folders[name])
        assert "\n" not in str(caught.value)
    for name in ("disguised", "head"):  # not a pickle format: safetensors refuses the bytes
        with pytest.raises(Exception) as caught:
            Predictor(folders[name])
        print(f"{name}: {one_line(caught.value)}")
    assert not marker.exists(), "a pickled payload ran while a model folder loaded"


def test_a_swap_refuses_what_is_not_a_model_folder_in_one_line(model, tmp_path):
    """What a replica's reconfigure runs: the user_config, then the load (which raises)."""
    from tl_ray.serve.app import _load, _slot

    loaded = _load(_slot({"model": str(model), "trial": None}))
    assert loaded.predictor.predict(["a fine film"])[0]["label"] in ("neg", "pos")
    bad = {**_not_models(model, tmp_path), **{
        name: (path, "") for name, path in _pickled(model, tmp_path, tmp_path / "ran").items()}}
    for name, (path, message) in bad.items():
        with pytest.raises(Exception) as caught:
            _load(_slot({"model": str(path)}))
        line = one_line(caught.value)
        assert message in line and "\n" not in line and len(line) <= 300, (name, line)
        if name in ("dot-dot", "empty-path"):
            assert isinstance(caught.value, ConfigError) and line.startswith("user_config.model: the model path")
        elif name not in ("disguised", "head"):
            assert isinstance(caught.value, TLRayError), (name, line)
    for config in ({}, {"model": 3}, {"model": str(model), "extra": 1}, "a string"):
        with pytest.raises(ConfigError, match=r"^user_config(\.model|\.extra)?: "):
            _slot(config)
    assert not (tmp_path / "ran").exists()


def test_serve_args_and_the_model_slot_refuse_dot_dot_paths():
    for path in ("../model", "runs/../../etc", "runs\\..\\model", "a\0b"):
        with pytest.raises(ValueError, match="has a '..' part|has a NUL byte"):
            ModelSlot(model=path)
        with pytest.raises(ValueError, match="has a '..' part|has a NUL byte"):
            ServeArgs(model=path)
    assert ModelSlot(model="runs/x/..model").model == "runs/x/..model"  # a name, not a parent
    assert ServeArgs(model=None).model is None


def test_a_folder_whose_copy_was_cut_short_is_refused(tmp_path):
    """The manifest lists each file's size: a truncated or missing file is one line."""
    import json

    from tl_ray.errors import CheckpointError
    from tl_ray.train.checkpoint import file_sizes, read_manifest

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    (folder / "labels.json").write_text('["a", "b"]')
    manifest = {"format_version": 1, "backbone": {"kind": "hf-text"}, "files": file_sizes(folder)}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert read_manifest(folder)["files"] == {"model.safetensors": 100}
    (folder / "model.safetensors").write_bytes(b"x" * 40)  # the copy stopped part-way
    with pytest.raises(CheckpointError, match=r"incomplete: model.safetensors has 40 bytes, its manifest says 100"):
        read_manifest(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"incomplete: it has no model.safetensors"):
        read_manifest(folder)
