"""tl_ray.io: a file or folder lands whole or not at all, and a dead writer leaves the old one."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tl_ray import io as tl_io
from tl_ray.io import atomic_folder, atomic_path, atomic_write, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]


def visible(folder: Path) -> list[str]:
    """What a reader listing `folder` for real names sees (temp names start with a dot)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def everything(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def crash_in(code: str, tmp_path: Path) -> None:
    """Run `code` in a fresh Python that dies (os._exit) inside the write: no cleanup runs."""
    script = f"import os, sys\nsys.path.insert(0, {str(ROOT)!r})\n{code}"
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 3, done.stderr


def test_atomic_write_replaces_a_file_with_text_or_bytes(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    assert atomic_write(path, "first\n") == path  # the parent folder is created
    atomic_write(path, b"second\x00")
    assert path.read_bytes() == b"second\x00"
    assert everything(path.parent) == ["a.txt"]


def test_write_json_atomic_writes_indented_json(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"labels": ["é"]}, ensure_ascii=False)
    text = (tmp_path / "a.json").read_text(encoding="utf-8")
    assert json.loads(text) == {"labels": ["é"]} and "é" in text and text.endswith("\n")


def test_a_writer_that_fails_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "table.parquet"
    path.write_text("old", encoding="utf-8")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half of the n", encoding="utf-8")
        raise RuntimeError("disk full")
    assert path.read_text(encoding="utf-8") == "old"
    assert everything(tmp_path) == ["table.parquet"]


def test_a_writer_killed_mid_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "state.json"
    path.write_text('{"old": true}', encoding="utf-8")
    crash_in(
        "from tl_ray.io import atomic_path\n"
        "with atomic_path('state.json') as tmp:\n"
        "    tmp.write_text('{\"new\": tr')\n"
        "    os._exit(3)\n",
        tmp_path,
    )
    assert json.loads(path.read_text(encoding="utf-8")) == {"old": True}
    assert visible(tmp_path) == ["state.json"]  # the dead writer's temp is hidden beside it


def test_readers_never_see_half_a_file(tmp_path):
    path = tmp_path / "big.txt"
    size = 1 << 20
    atomic_write(path, "a" * size)
    stop, seen = threading.Event(), []

    def read() -> None:
        while not stop.is_set():
            text = path.read_text(encoding="utf-8")
            seen.append(len(text) == size and len(set(text)) == 1)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(30):
            atomic_write(path, "ab"[i % 2] * size)
    finally:
        stop.set()
        reader.join()
    assert seen and all(seen)


def test_atomic_folder_creates_a_new_folder(tmp_path):
    target = tmp_path / "parent" / "export"
    with atomic_folder(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".export.") and not tmp.exists()
        tmp.mkdir()
        (tmp / "model.onnx").write_text("new", encoding="utf-8")
    assert everything(target) == ["model.onnx"] and everything(target.parent) == ["export"]


def test_atomic_folder_renames_over_an_empty_folder(tmp_path):
    (tmp_path / "out").mkdir()
    with atomic_folder(tmp_path / "out", replace=False) as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("a", encoding="utf-8")
    assert everything(tmp_path / "out") == ["a"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_atomic_folder_replaces_a_full_folder_and_deletes_the_old_one(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(tl_io, "_exchange", lambda a, b: False)
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old", encoding="utf-8")
    with atomic_folder(target) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new", encoding="utf-8")
    assert everything(target) == ["new.txt"] and everything(tmp_path) == ["model"]


def test_without_replace_a_full_folder_wins(tmp_path):
    """The race guard: of two writers publishing the same folder, the first one stays."""
    target = tmp_path / "cache"
    with pytest.raises(FileExistsError), atomic_folder(target, replace=False) as second:
        second.mkdir()
        (second / "meta.json").write_text("second", encoding="utf-8")
        with atomic_folder(target, replace=False) as first:  # finishes while `second` writes
            first.mkdir()
            (first / "meta.json").write_text("first", encoding="utf-8")
    assert (target / "meta.json").read_text(encoding="utf-8") == "first"
    assert everything(tmp_path) == ["cache"]


def test_a_folder_writer_that_fails_leaves_the_old_folder_and_no_temp(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("old", encoding="utf-8")
    with pytest.raises(OSError), atomic_folder(target) as tmp:
        tmp.mkdir()
        (tmp / "weights").write_text("ne", encoding="utf-8")
        raise OSError(28, "No space left on device")
    assert everything(target) == ["weights"] and (target / "weights").read_text(encoding="utf-8") == "old"
    assert everything(tmp_path) == ["model"]


def test_a_folder_writer_killed_mid_write_leaves_the_old_folder(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("old", encoding="utf-8")
    crash_in(
        "from tl_ray.io import atomic_folder\n"
        "with atomic_folder('model') as tmp:\n"
        "    tmp.mkdir()\n"
        "    (tmp / 'weights').write_text('ne')\n"
        "    os._exit(3)\n",
        tmp_path,
    )
    assert everything(target) == ["weights"] and (target / "weights").read_text(encoding="utf-8") == "old"
    assert visible(tmp_path) == ["model"]


def test_a_file_in_the_way_is_not_replaced(tmp_path):
    (tmp_path / "out").write_text("a file", encoding="utf-8")
    with pytest.raises(NotADirectoryError), atomic_folder(tmp_path / "out") as tmp:
        tmp.mkdir()
    assert (tmp_path / "out").read_text(encoding="utf-8") == "a file" and everything(tmp_path) == ["out"]
