"""Where an export may land (atomic, never over or inside the model) and which kinds each
format takes: fast checks on manifest-only folders and a stand-in writer."""

from __future__ import annotations

from pathlib import Path

import pytest

from tl_ray.errors import BackboneError, ConfigError
from tl_ray.export.formats import FORMATS, formats_for, listed_files, publish


def _writer(calls: list | None = None, fail: bool = False):
    def write(source: Path, folder: Path) -> None:
        folder.mkdir()
        (folder / "new.txt").write_text("new", encoding="utf-8")
        (folder / "sub").mkdir()
        (folder / "sub" / "deep.bin").write_bytes(b"\0")
        if calls is not None:
            calls.append((source, folder))
        if fail:
            raise RuntimeError("writer failed half way")

    return write


def _beside(path: Path) -> list[str]:
    """Temp or old folders left next to `path`."""
    return [p.name for p in path.parent.iterdir() if p.name.startswith(".")]


def test_formats_table_names_the_kinds():
    assert formats_for("hf-text") == ["hf", "onnx"]
    assert formats_for("word-vectors") == ["onnx"]
    assert formats_for("keras-image") == ["savedmodel"]
    assert set(FORMATS) == {"hf", "onnx", "savedmodel"}


def test_publish_writes_beside_and_renames_into_place(fake_model, tmp_path):
    source, calls = fake_model("hf-text"), []
    target = publish(source, tmp_path / "out" / "hf", "hf", _writer(calls))
    assert target == (tmp_path / "out" / "hf").resolve()
    assert calls[0][0] == source.resolve() and calls[0][1].parent == target.parent
    assert calls[0][1].name.startswith(".hf.") and calls[0][1].name.endswith(".tmp")
    assert listed_files(target) == ["new.txt", "sub/deep.bin"]
    assert _beside(target) == []


def test_an_empty_folder_is_filled_without_force(fake_model, tmp_path):
    (tmp_path / "empty").mkdir()
    assert listed_files(publish(fake_model("hf-text"), tmp_path / "empty", "hf", _writer())) == [
        "new.txt", "sub/deep.bin"]  # fmt: skip


def test_a_non_empty_folder_needs_force_and_is_then_replaced_whole(fake_model, tmp_path):
    source, out = fake_model("hf-text"), tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old", encoding="utf-8")
    with pytest.raises(ConfigError, match="exists and is not empty; pass --force"):
        publish(source, out, "hf", _writer())
    assert listed_files(out) == ["old.txt"]
    publish(source, out, "hf", _writer(), force=True)
    assert listed_files(out) == ["new.txt", "sub/deep.bin"] and _beside(out) == []


def test_a_failed_export_leaves_the_old_folder_and_no_temp(fake_model, tmp_path):
    source, out = fake_model("hf-text"), tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old", encoding="utf-8")
    with pytest.raises(RuntimeError, match="half way"):
        publish(source, out, "hf", _writer(fail=True), force=True)
    assert listed_files(out) == ["old.txt"] and _beside(out) == []


@pytest.mark.parametrize("where, message", [
    (".", "is inside the model folder"),
    ("sub/export", "is inside the model folder"),
    ("..", "holds the model folder"),
])  # fmt: skip
def test_the_model_folder_is_never_overwritten(fake_model, tmp_path, where, message):
    source = fake_model("hf-text", tmp_path / "runs" / "model")
    with pytest.raises(ConfigError, match=message):
        publish(source, source / where, "hf", _writer(), force=True)
    assert listed_files(source) == ["manifest.json"] and _beside(source) == []


def test_a_symlink_to_the_model_is_the_model(fake_model, tmp_path):
    source = fake_model("hf-text")
    (tmp_path / "link").symlink_to(source)
    with pytest.raises(ConfigError, match="is inside the model folder"):
        publish(source, tmp_path / "link", "hf", _writer(), force=True)


def test_a_file_is_not_a_target(fake_model, tmp_path):
    (tmp_path / "file").write_text("x", encoding="utf-8")
    with pytest.raises(ConfigError, match="is a file"):
        publish(fake_model("hf-text"), tmp_path / "file", "hf", _writer(), force=True)


@pytest.mark.parametrize("kind, fmt, names", [
    ("keras-image", "hf", "use --format savedmodel"),
    ("keras-image", "onnx", "use --format savedmodel"),
    ("hf-text", "savedmodel", "use --format hf or onnx"),
    ("word-vectors", "savedmodel", "use --format onnx"),
    ("word-vectors", "hf", "use --format onnx"),
])  # fmt: skip
def test_each_format_refuses_the_kinds_it_does_not_export(fake_model, tmp_path, kind, fmt, names):
    with pytest.raises(BackboneError, match=f"holds a {kind} model: {names}$"):
        publish(fake_model(kind), tmp_path / "out", fmt, _writer())
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["--format", "tflite"], "--format must be one of hf, onnx, savedmodel, got 'tflite'"),
    (["--format", "hf", "--quantize", "int8"], "--quantize int8 applies to --format onnx only"),
    (["--format", "onnx", "--quantize", "int4"], "--quantize must be int8, got 'int4'"),
    (["--format", "savedmodel"], "holds a hf-text model: use --format hf or onnx"),
    (["--format", "hf", "--out", "{model}/inside"], "is inside the model folder"),
])  # fmt: skip
def test_the_command_fails_with_one_line_and_exit_code_2(fake_model, export_cli, tmp_path, argv, message):
    source = fake_model("hf-text")
    argv = [a.replace("{model}", str(source)) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    code, _, err = export_cli(source, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0] and not (tmp_path / "out").exists()


def test_a_folder_that_is_no_model_is_one_line(export_cli, tmp_path):
    code, _, err = export_cli(tmp_path, "--format", "hf", "--out", tmp_path.parent / "x")
    assert code == 2 and err.strip() == f"error: {tmp_path} is not a tl-ray checkpoint: it has no manifest.json"
