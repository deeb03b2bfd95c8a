"""Export a torch model folder (hf-text, word-vectors) to an ONNX model folder.

The ONNX folder is self-describing like the checkpoint it came from: `model.onnx` (encoder,
pooling and head in one graph; dynamic `batch` and `sequence` axes; input names as
`preprocess` produces them), the tokenizer files or the word-vectors vocabulary,
`labels.json`, and `manifest.json` (the source's manifest plus an `onnx` section). It is
written into a temp folder beside the target and renamed into place, and checked before
that: its logits on texts of different lengths must match torch's within 1e-4.

The exporter is `torch.onnx.export(dynamo=True)` (torch.export + onnxscript), the default
and recommended path since torch 2.9; the TorchScript one is deprecated.

Example:
    >>> export_onnx("runs/demo/model", "runs/demo/model-onnx")           # doctest: +SKIP
    PosixPath('/.../runs/demo/model-onnx')
    >>> cached_export("runs/demo/model", quantize=True)                  # doctest: +SKIP
    PosixPath('/.../runs/demo/.onnx/model-3f9c0a7d51e2b846-int8')
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from tl_ray.errors import BackboneError, CheckpointError, ConfigError
from tl_ray.io import atomic_folder

__all__ = ["EXPORT_VERSION", "ONNX_FILE", "cached_export", "export_onnx", "is_onnx_export",
           "require_onnx"]  # fmt: skip

ONNX_FILE = "model.onnx"
EXPORT_VERSION = 1  # bump when the graph changes: cached exports get a new key
CACHE_DIR = ".onnx"  # cached exports: <model's parent>/.onnx/<name>-<key>-<fp32|int8>/
TOLERANCE = 1e-4  # max |logit difference| to torch, relative to the largest logit (at least 1)
_PACKAGES = {"onnx": "onnx", "onnxscript": "onnxscript", "onnxruntime": "onnxruntime"}
_WORD_VECTOR_FILES = ("word_vectors.json", "ngrams.safetensors")


def require_onnx(*modules: str) -> None:
    """ConfigError naming the `onnx` extra if any of `modules` cannot be imported."""
    missing = [m for m in modules or tuple(_PACKAGES) if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"the ONNX runtime needs {', '.join(missing)}: pip install 'tl-ray[onnx]'")


def is_onnx_export(folder: str | Path) -> bool:
    """Whether `folder` is an ONNX model folder written by `export_onnx`."""
    manifest = Path(folder) / "manifest.json"
    if not (Path(folder) / ONNX_FILE).is_file() or not manifest.is_file():
        return False
    try:
        return "onnx" in json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def export_onnx(model_folder: str | Path, out_dir: str | Path, *, quantize: bool = False) -> Path:
    """Write the ONNX folder of checkpoint `model_folder` to `out_dir` (replacing an old export).

    `quantize` adds dynamic int8 quantization of the matrix products (onnxruntime's
    `quantize_dynamic`). `out_dir` may not be, hold or lie inside the source folder, nor be an
    existing folder other than an earlier ONNX export.
    """
    source, target = Path(model_folder).resolve(), Path(out_dir).resolve()
    if target == source or source in target.parents or target in source.parents:
        raise ConfigError(f"ONNX export target {target} overlaps the model folder {source}; "
                          "pick a folder outside it")  # fmt: skip
    _check_source(source)
    if target.exists() and any(target.iterdir()) and not is_onnx_export(target):
        raise ConfigError(f"{target} exists and is not an ONNX export; pick a new folder")
    with atomic_folder(target) as tmp:  # an earlier export is swapped out, then deleted
        _write_export(source, tmp, quantize=quantize)
    return target


def cached_export(model_folder: str | Path, *, quantize: bool = False) -> Path:
    """The ONNX folder of `model_folder`, exported on first use into a versioned cache.

    The cache is `<parent>/.onnx/<name>-<key>-<fp32|int8>/` (key: a digest of the folder's
    manifest and its files' names, sizes and times), or under `~/.cache/tl-ray/onnx/` when
    the parent is read-only. Replicas loading at once take turns on a lock; the export is
    renamed into place whole, so none ever reads half of one.
    """
    source = Path(model_folder).resolve()
    _check_source(source)
    variant = "int8" if quantize else "fp32"
    key = _folder_key(source, variant)
    root = source.parent / CACHE_DIR
    if not _writable(source.parent, root):
        root = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "tl-ray" / "onnx"
        key = hashlib.sha256(f"{source}\0{key}".encode()).hexdigest()[:16]
    target = root / f"{source.name}-{key}-{variant}"
    if is_onnx_export(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        if not is_onnx_export(target):  # another replica may have exported it meanwhile
            try:
                with atomic_folder(target, replace=False) as tmp:
                    _write_export(source, tmp, quantize=quantize)
            except FileExistsError:
                if not is_onnx_export(target):  # else: the same export is there already
                    raise
    return target


# -- checks and cache keys -----------------------------------------------------------------
def _check_source(source: Path) -> dict[str, Any]:
    from tl_ray.export.graphs import TORCH_KINDS
    from tl_ray.train.checkpoint import read_manifest

    if is_onnx_export(source):
        raise ConfigError(f"{source} is already an ONNX export; export its source checkpoint")
    manifest = read_manifest(source)
    kind = manifest.get("backbone", {}).get("kind")
    if kind not in TORCH_KINDS:
        raise BackboneError(f"ONNX export covers torch models ({', '.join(TORCH_KINDS)}); {source} "
                            f"holds a {kind} model: serve it with runtime 'torch' (its own framework)")
    return manifest


def _folder_key(folder: Path, variant: str) -> str:
    digest = hashlib.sha256(f"{EXPORT_VERSION}\0{variant}\0".encode())
    digest.update((folder / "manifest.json").read_bytes())
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.name != "train_state.pt"):
        stat = path.stat()
        digest.update(f"\0{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _writable(parent: Path, root: Path) -> bool:
    return os.access(root if root.is_dir() else parent, os.W_OK | os.X_OK)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on `folder` (flock; none where there is none, e.g. Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # a file system without flock: the rename still guards
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


# -- the export itself ---------------------------------------------------------------------
def _write_export(source: Path, folder: Path, *, quantize: bool) -> None:
    """Export the model, check it against torch, then add assets, labels and manifest."""
    import torch

    from tl_ray.export.graphs import export_view
    from tl_ray.io import write_json_atomic
    from tl_ray.train.checkpoint import LABELS_FILE, file_sizes, load_model_folder

    require_onnx("onnx", "onnxscript", "onnxruntime")
    backbone, model, labels, manifest = load_model_folder(source)
    folder.mkdir(parents=True)
    max_length = int(manifest.get("max_length", 128))
    fp32 = folder / ("model.fp32.onnx" if quantize else ONNX_FILE)
    with warnings.catch_warnings():  # peft's merge and torch.export warn about their internals
        warnings.simplefilter("ignore")
        view, example, dynamic = export_view(backbone, model.cpu(), max_length)
        _torch_export(view, example, dynamic, fp32)
    with torch.no_grad():
        expected = view(**example).float().numpy()
    _check_matches(fp32, {k: v.numpy() for k, v in example.items()}, expected, source)
    if quantize:
        _quantize(fp32, folder / ONNX_FILE)
        fp32.unlink()
    _save_assets(backbone, view, source, folder)
    labels.save(folder / LABELS_FILE)
    write_json_atomic(folder / "manifest.json", {**manifest, "files": file_sizes(folder), "onnx": {
        "file": ONNX_FILE, "inputs": list(example), "outputs": ["logits"],
        "quantization": "dynamic-int8" if quantize else None, "source": str(source),
        "exporter": "torch.onnx.export(dynamo=True)", "export_version": EXPORT_VERSION,
        "versions": _versions()}})  # fmt: skip


def _torch_export(view: Any, example: dict, dynamic: dict, path: Path) -> None:
    import torch

    weights = sum(p.numel() * p.element_size() for p in view.parameters())
    with _quiet("torch.onnx", "torch.export", "torch._dynamo"):
        try:
            program = torch.onnx.export(
                view, (), kwargs=example, dynamo=True, dynamic_shapes=dynamic,
                output_names=["logits"], external_data=weights > 1 << 30, verbose=False,
            )  # fmt: skip
        except Exception as error:  # torch.export raises many types; the first line says why
            first = (str(error).strip().splitlines() or [""])[0]
            raise BackboneError(f"torch.onnx.export failed ({type(error).__name__}): {first}") from None
        program.save(str(path), external_data=weights > 1 << 30)


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Errors only from these loggers for a while (the exporter logs skipped op libraries)."""
    saved = [(logging.getLogger(name), logging.getLogger(name).level) for name in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def _check_matches(path: Path, inputs: dict, expected: Any, source: Path) -> None:
    import numpy as np

    from tl_ray.export.runtime import new_session

    got = new_session(path, "cpu", 1).run(["logits"], inputs)[0]
    worst = float(np.abs(got - expected).max())
    if worst > TOLERANCE * max(1.0, float(np.abs(expected).max())):
        raise CheckpointError(f"ONNX export of {source} does not match torch: max |logit "
                              f"difference| {worst:.2e} > {TOLERANCE:g}")  # fmt: skip


def _quantize(fp32: Path, path: Path) -> None:
    """Dynamic int8 weights for the matrix products (activations quantized at run time).

    Per-channel weight scales: on MiniLM with an MR head they kept 96% of the predictions
    where one scale per tensor kept 89% (benchmarks/onnx_runtime.py, 400 sentences).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet("root"):
        quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"])  # fmt: skip


def _save_assets(backbone: Any, view: Any, source: Path, folder: Path) -> None:
    """What `preprocess` needs: the tokenizer (and encoder config) or the vocabulary."""
    if backbone.kind == "hf-text":
        backbone.tokenizer.save_pretrained(str(folder))
        view.model.encoder.config.save_pretrained(str(folder))
        return
    for name in _WORD_VECTOR_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)


def _versions() -> dict[str, str]:
    found = {}
    for package in ("torch", *_PACKAGES):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[package] = metadata.version(package)
    return found
