"""Safe swaps without Ray: `tl-ray serve` hands Serve an immutable, versioned copy of the model
folder (a later re-export of the original never changes what a replica loads), and the checks
a replica runs (`check_usable`, the one-line swap error). Over real Serve: tests/serve/test_app.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import cli_lines

from tl_ray.cli.serve import versioned_model
from tl_ray.errors import CheckpointError
from tl_ray.serve.api import SERVED_DIR, one_line


def _folder(path: Path, weights: bytes, created: str = "2026-01-01T00:00:00Z") -> Path:
    """A model folder's shape: manifest, labels, weights and (to be left out) resume state."""
    path.mkdir(parents=True, exist_ok=True)
    manifest = {"format_version": 1, "backbone": {"kind": "hf-text"}, "created": created}
    (path / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    (path / "labels.json").write_text('["neg", "pos"]', encoding="utf-8")
    (path / "tokenizer").mkdir(exist_ok=True)
    (path / "tokenizer" / "vocab.txt").write_text("[PAD]\nfilm\n", encoding="utf-8")
    (path / "model.safetensors").write_bytes(weights)
    (path / "train_state.pt").write_bytes(b"resume state, not for serving")
    return path


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_copy_is_versioned_complete_read_only_and_left_alone_by_a_rewrite(tmp_path):
    model = _folder(tmp_path / "runs" / "x" / "model", b"weights v1")
    original = _contents(model)
    served = versioned_model(model)
    assert served.parent == tmp_path / "runs" / "x" / SERVED_DIR
    assert len(served.name) == 16 and int(served.name, 16) >= 0  # a content hash
    held = _contents(served)
    assert held == {k: v for k, v in original.items() if k != "train_state.pt"}
    assert all(p.stat().st_mode & 0o222 == 0 for p in served.rglob("*") if p.is_file())
    assert [p.name for p in served.parent.iterdir()] == [served.name]  # no temp folder left

    # A new search rewrites model/ in place, then another replaces the folder wholesale.
    (model / "model.safetensors").write_bytes(b"weights v2, written in place")
    _folder(model, b"weights v2", created="2026-02-01T00:00:00Z")
    assert _contents(served) == held
    shutil.rmtree(model)
    _folder(model, b"weights v3", created="2026-03-01T00:00:00Z")
    assert _contents(served) == held

    newer = versioned_model(model)
    assert newer != served and newer.parent == served.parent
    assert (newer / "model.safetensors").read_bytes() == b"weights v3"
    assert _contents(served) == held


def test_same_content_is_one_version_and_a_versioned_folder_is_served_as_is(tmp_path):
    model = _folder(tmp_path / "model", b"weights")
    first = versioned_model(model)
    assert versioned_model(model) == first
    assert versioned_model(first) == first
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]


def test_a_folder_that_is_not_a_model_or_cannot_be_copied_is_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        versioned_model(tmp_path / "missing")
    model = _folder(tmp_path / "model", b"weights")
    (tmp_path / SERVED_DIR).write_text("a file where the versions folder goes", encoding="utf-8")
    with pytest.raises(CheckpointError) as caught:
        versioned_model(model)
    assert f"cannot copy {model} to {tmp_path / SERVED_DIR}: " in str(caught.value)
    assert "\n" not in str(caught.value)


def test_export_config_points_at_the_versioned_folder(tmp_path):
    model = _folder(tmp_path / "experiment" / "model", b"weights")
    target = tmp_path / "serve.yaml"
    line = cli_lines("serve", model, "--export-config", target)[-1]
    served = Path(line["model"])
    assert line["source"] == str(model) and served.parent == model.parent / SERVED_DIR
    config = yaml.safe_load(target.read_text(encoding="utf-8"))
    assert config["applications"][0]["deployments"][0]["user_config"]["model"] == str(served)
    (model / "model.safetensors").write_bytes(b"a re-export")
    assert (served / "model.safetensors").read_bytes() == b"weights"


def test_check_usable_fails_only_when_a_replica_cannot_serve(tmp_path, tiny_bert):
    import torch

    from tl_ray.backbones.registry import get_backbone
    from tl_ray.config import HFTextConfig
    from tl_ray.data import LabelMap
    from tl_ray.serve.api import ModelSlot
    from tl_ray.serve.app import _load, check_usable
    from tl_ray.train.checkpoint import write_model_folder

    torch.manual_seed(0)
    backbone = get_backbone(HFTextConfig(name_or_path=tiny_bert, unfreeze_depth=1))
    (tmp_path / "model").mkdir()
    write_model_folder(tmp_path / "model", backbone, backbone.build(2), LabelMap(("neg", "pos")),
                       metrics={}, epoch=1)  # fmt: skip
    loaded = _load(ModelSlot(model=str(versioned_model(tmp_path / "model"))))
    assert loaded.info.version == loaded.info.path.rsplit("/", 1)[1]
    check_usable(loaded)
    check_usable(None)  # no model configured yet: the replica answers 503, it is not broken
    loaded.predictor.model = None
    with pytest.raises(RuntimeError, match="has no model"):
        check_usable(loaded)


def test_swap_errors_are_one_line():
    assert one_line(OSError("no file named model.safetensors\n  in /m")) == (
        "OSError: no file named model.safetensors"
    )
    assert one_line(CheckpointError("/m/manifest.json is not valid JSON")) == (
        "/m/manifest.json is not valid JSON"
    )
    assert one_line(ValueError("")) == "ValueError: no message"
    assert len(one_line(ValueError("x" * 1000))) == 300
