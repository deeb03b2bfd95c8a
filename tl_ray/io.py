"""Small file helpers: every write lands whole or not at all.

A file or a folder is written under a temp name beside its target (the same folder, so the
same filesystem) and renamed into place: a reader sees the old one or the new one, never
half of one, and a writer that dies leaves at most a dot-named `.NAME.<hex>.tmp` beside it.
Stdlib only (cluster/local_cluster.py loads this file by path, without tl_ray's packages).

Example:
    >>> write_json_atomic("/tmp/example.json", {"a": 1})
    >>> with atomic_folder("/tmp/example-folder") as tmp:
    ...     tmp.mkdir()
    ...     _ = (tmp / "a.txt").write_text("a")
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_folder", "atomic_path", "atomic_write", "temp_beside", "write_json_atomic"]


def temp_beside(path: str | Path, suffix: str = ".tmp") -> Path:
    """A fresh hidden name in `path`'s folder, `.NAME.<32 hex><suffix>` (nothing is created).

    >>> temp_beside("/data/model").name.startswith(".model.")
    True
    """
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}{suffix}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp file path beside `path`, for writers that take a path (pyarrow, gensim, ...).

    When the block ends the temp file replaces `path` in one rename; if the block raises, the
    temp file is removed and `path` is left as it was. The parent folder is created.

    >>> with atomic_path("/tmp/example.txt") as tmp:
    ...     _ = tmp.write_text("whole")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: str | bytes, *, encoding: str = "utf-8") -> Path:
    """Write `data` (text or bytes) to `path` whole: temp file, fsync, rename. Returns `path`.

    >>> atomic_write("/tmp/example.txt", "whole\\n").read_text()
    'whole\\n'
    """
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data.encode(encoding) if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())  # the data is on disk before the name points at it
    return Path(path)


def write_json_atomic(path: str | Path, payload: Any, *, ensure_ascii: bool = True) -> None:
    """Write `payload` as indented JSON (and a newline) to `path` with `atomic_write`.

    >>> write_json_atomic("/tmp/example.json", {"a": 1})
    """
    atomic_write(path, json.dumps(payload, indent=2, ensure_ascii=ensure_ascii) + "\n")


@contextmanager
def atomic_folder(target: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """A temp folder path beside `target`, renamed to `target` when the block ends.

    The path does not exist yet: the block creates it (`mkdir`, `copytree`, a writer that
    makes its folder). If the block raises, the temp folder is removed and `target` is left
    as it was. An absent or empty `target` is replaced by one rename; a non-empty one is
    swapped out with `replace` (one atomic exchange on Linux, else two renames) and deleted.
    Without `replace` a non-empty `target` is kept and FileExistsError raised: of writers
    racing to publish the same folder, exactly one wins.

    >>> with atomic_folder("/tmp/example-folder") as tmp:
    ...     shutil.copytree("/etc/skel", tmp)  # doctest: +SKIP
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(target)
    try:
        yield tmp
        _move_folder(tmp, target, replace=replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed write, or the old folder after a swap


def _move_folder(tmp: Path, target: Path, *, replace: bool) -> None:
    """Rename `tmp` to `target`; a replaced `target` ends at `tmp` (for the caller to delete)."""
    try:
        os.rename(tmp, target)  # POSIX: also over an empty folder; fails over a non-empty one
        return
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    if not replace:
        raise FileExistsError(errno.EEXIST, "a non-empty folder is already there", str(target))
    if _exchange(tmp, target):
        return
    old = temp_beside(target, ".old")
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except OSError:
        os.rename(old, target)  # put the old folder back
        raise
    os.rename(old, tmp)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
