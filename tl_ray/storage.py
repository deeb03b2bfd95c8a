"""Where checkpoints go: a local/NFS path or an `s3://` / `gs://` / `file://` URI.

Ray Train writes each checkpoint from the worker that made it, so on a multi-node cluster the
storage must be reachable from every node. A URI is opened through pyarrow's filesystems (as
Ray does); a plain path is probed: the driver writes a marker file there and a tiny task on
every other alive node must find it, or the run stops before training with the node named.

The driver still writes `output` itself (search.json, the Optuna study, trials.parquet,
best.json, the exported model/): keep `output` on the driver's disk or a shared mount, and
point `storage_path` at shared storage for checkpoints.

Folders that several nodes read (the frozen-prefix cache) are published there with
`publish_folder`: a reader that finds its marker file finds the whole folder. On a local or
NFS path that is one atomic rename; on an object store (no rename) every other file is
uploaded first and the marker last. `download_folder` copies one back to a node's disk.

Example:
    >>> storage_location(None, "/runs/x"), storage_location("s3://bucket/ckpt", "/runs/x")  # doctest: +SKIP
    ('/runs/x', 's3://bucket/ckpt')
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from tl_ray.errors import ConfigError, TLRayError
from tl_ray.io import atomic_folder, atomic_write

__all__ = [
    "check_reachable",
    "download_folder",
    "fetch_checkpoint",
    "filesystem_of",
    "is_uri",
    "publish_folder",
    "read_text",
    "resolve_storage",
    "storage_location",
    "write_text",
]

log = logging.getLogger("tl_ray.storage")
_SCHEMES = ("s3", "gs", "gcs", "file", "hdfs", "abfs", "abfss", "mock")
_PROBE_TIMEOUT_S = 120.0


def is_uri(location: str) -> bool:
    """True for `scheme://...` locations.

    >>> is_uri("s3://bucket/runs"), is_uri("/mnt/nfs/runs")
    (True, False)
    """
    return "://" in location


def resolve_storage(location: str) -> str:
    """An absolute local path, or a URI that pyarrow can open (checked here, not mid-run)."""
    if not is_uri(location):
        return str(Path(location).expanduser().resolve())
    scheme = location.split("://", 1)[0].lower()
    if scheme not in _SCHEMES:
        raise ConfigError(
            f"storage_path: unsupported scheme {scheme!r} in {location!r}; use a shared local "
            f"path (NFS) or one of {', '.join(s + '://' for s in _SCHEMES[:3])}"
        )
    import pyarrow.fs

    try:
        pyarrow.fs.FileSystem.from_uri(location)
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ... for bad URIs/credentials
        raise ConfigError(f"storage_path: cannot open {location!r}: {str(error).splitlines()[0]}") from None
    return location


def _sees(path: str, token: str) -> bool:
    try:
        return Path(path).read_text(encoding="utf-8") == token
    except OSError:
        return False


def _describe(node: dict[str, Any]) -> str:
    named = [k.removeprefix("tl_node_") for k in node.get("Resources", {}) if k.startswith("tl_node_")]
    label = f"{named[0]} " if named else ""
    return f"{label}{node['NodeManagerAddress']} (id {node['NodeID'][:12]})"


def check_reachable(location: str, *, marker_name: str | None = None) -> None:
    """On a multi-node cluster, fail unless every alive node sees files written at `location`.

    A URI is shared by construction and is not probed. `marker_name` lets a test probe for a
    file that was never written, to see the failure.
    """
    if is_uri(location):
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    others = [n for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here]
    if not others:
        return
    folder = Path(location)
    folder.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    marker = folder / (marker_name or f".tl-ray-storage-probe-{token}")
    if marker_name is None:
        marker.write_text(token, encoding="utf-8")
    probe = ray.remote(num_cpus=0, max_retries=0)(_sees)
    try:
        pending = {
            probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote(str(marker), token): node
            for node in others
        }
        ready, late = ray.wait(list(pending), num_returns=len(pending), timeout=_PROBE_TIMEOUT_S)
        blind = [pending[ref] for ref in ready if not ray.get(ref)]
    finally:
        if marker_name is None:
            marker.unlink(missing_ok=True)
    if late:
        log.warning("storage check: %d node(s) did not answer in %.0f s", len(late), _PROBE_TIMEOUT_S)
    if blind:
        raise ConfigError(
            f"storage_path {location} is not shared: node {_describe(blind[0])}"
            + (f" and {len(blind) - 1} more" if len(blind) > 1 else "")
            + " cannot see files written there by the driver; mount the same NFS path on every "
            "node, or set storage_path to an s3:// or gs:// URI"
        )


def fetch_checkpoint(path: str, location: str) -> Path:
    """A local copy of checkpoint `path` (a path inside the filesystem of URI `location`)."""
    if not is_uri(location):
        return Path(path)
    import pyarrow.fs

    filesystem, _ = pyarrow.fs.FileSystem.from_uri(location)
    target = Path(tempfile.mkdtemp(prefix="tl-ray-fetch-"))
    try:
        pyarrow.fs.copy_files(path, str(target), source_filesystem=filesystem,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())  # fmt: skip
    except Exception:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return target


def storage_location(storage_path: str | None, output: str | os.PathLike) -> str:
    """Where checkpoints go: `storage_path` when set, else the output folder."""
    return resolve_storage(storage_path) if storage_path else str(Path(output).expanduser().resolve())


def filesystem_of(location: str) -> tuple[Any, str]:
    """pyarrow's filesystem for `location` and the path inside it (a plain path: local)."""
    import pyarrow.fs

    if is_uri(location):
        return pyarrow.fs.FileSystem.from_uri(location)
    return pyarrow.fs.LocalFileSystem(), str(Path(location).expanduser().resolve())


def read_text(location: str, name: str) -> str | None:
    """The text of file `name` in folder `location` (a path or a URI), or None if absent."""
    import pyarrow.fs

    filesystem, path = filesystem_of(location)
    if filesystem.get_file_info(f"{path}/{name}").type != pyarrow.fs.FileType.File:
        return None
    with filesystem.open_input_stream(f"{path}/{name}") as stream:
        return stream.read().decode("utf-8")


def write_text(location: str, name: str, text: str) -> None:
    """Write file `name` in folder `location` whole: a temp file and a rename on a local or
    NFS path, one object put (never seen half-written) on an object store."""
    import pyarrow.fs

    filesystem, path = filesystem_of(location)
    if isinstance(filesystem, pyarrow.fs.LocalFileSystem):
        atomic_write(Path(path) / name, text)
        return
    filesystem.create_dir(path, recursive=True)
    with filesystem.open_output_stream(f"{path}/{name}") as stream:
        stream.write(text.encode("utf-8"))


def publish_folder(folder: Path, location: str, *, marker: str) -> bool:
    """Move or copy the flat local `folder` to `location`; readers trust it once `marker` is there.

    Returns False, leaving `folder` to the caller, when a folder with `marker` is already
    published there (another writer won a race; both wrote the same content).

    >>> publish_folder(Path("/tmp/built"), "s3://bucket/cache/ab12", marker="meta.json")  # doctest: +SKIP
    True
    """
    import pyarrow.fs

    filesystem, path = filesystem_of(location)
    if read_text(location, marker) is not None:
        return False
    if isinstance(filesystem, pyarrow.fs.LocalFileSystem):  # a local disk or an NFS mount
        return _rename_into_place(folder, Path(path), marker)
    return _upload_marker_last(folder, filesystem, path, marker)


def _rename_into_place(folder: Path, target: Path, marker: str) -> bool:
    """One atomic rename (a copy beside the target first when it is on another filesystem)."""
    try:
        with atomic_folder(target, replace=False) as staged:  # a non-empty target: the race is lost
            try:
                os.rename(folder, staged)  # same filesystem: nothing is copied
            except OSError as error:
                if error.errno != errno.EXDEV:
                    raise
                shutil.copytree(folder, staged)
    except OSError:
        if (target / marker).is_file():
            return False
        if target.is_dir() and any(target.iterdir()):
            raise TLRayError(
                f"{target} exists without {marker} (an interrupted copy?); delete it and run again"
            ) from None
        raise
    return True


def _upload_marker_last(folder: Path, filesystem: Any, path: str, marker: str) -> bool:
    """Object stores have no rename: each object is written whole, and the marker last."""
    import pyarrow.fs

    files = sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.name == marker)
    local = pyarrow.fs.LocalFileSystem()
    for item in files:
        destination = f"{path}/{item.relative_to(folder).as_posix()}"
        filesystem.create_dir(destination.rsplit("/", 1)[0], recursive=True)
        pyarrow.fs.copy_files(str(item), destination, source_filesystem=local, destination_filesystem=filesystem)
    return True


def download_folder(location: str, target: Path) -> None:
    """Copy the folder at `location` (a path or a URI) into the local folder `target`."""
    import pyarrow.fs

    filesystem, path = filesystem_of(location)
    target.mkdir(parents=True, exist_ok=True)
    pyarrow.fs.copy_files(path, str(target), source_filesystem=filesystem,
                          destination_filesystem=pyarrow.fs.LocalFileSystem())  # fmt: skip
