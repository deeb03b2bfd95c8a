"""`tl-ray export`'s formats, which model kinds each takes, and where an export lands.

An export is written into a temp folder beside its target and renamed into place, so the
target never holds half of one. The target may not be the model folder, lie inside it or
hold it; an existing non-empty target is refused unless `force`, which swaps the new export
in (one atomic exchange on Linux, else two renames) and then deletes the old one.

Example:
    >>> formats_for("keras-image")
    ['savedmodel']
    >>> export_model("runs/demo/model", "exports/demo-hf", format="hf")  # doctest: +SKIP
    PosixPath('/.../exports/demo-hf')
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from tl_ray.errors import BackboneError, ConfigError
from tl_ray.io import atomic_folder

__all__ = ["FORMATS", "check_source", "check_target", "export_model", "formats_for", "listed_files",
           "publish"]  # fmt: skip

# format -> the backbone kinds it exports (a fixed table: the CLI validates before any import)
FORMATS: dict[str, tuple[str, ...]] = {
    "hf": ("hf-text",),
    "onnx": ("hf-text", "word-vectors"),
    "savedmodel": ("keras-image",),
}
Writer = Callable[[Path, Path], Any]  # (model folder, new folder to create) -> anything


def formats_for(kind: str | None) -> list[str]:
    """The formats that export a `kind` model, in FORMATS order."""
    return [name for name, kinds in FORMATS.items() if kind in kinds]


def check_source(source: Path, fmt: str) -> dict[str, Any]:
    """The manifest of model folder `source`, if `fmt` can export its kind; else one line."""
    from tl_ray.export.onnx import is_onnx_export
    from tl_ray.train.checkpoint import read_manifest

    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if is_onnx_export(source):
        raise ConfigError(f"{source} is already an ONNX export; export the checkpoint it came from")
    manifest = read_manifest(source)
    kind = manifest.get("backbone", {}).get("kind")
    if kind not in FORMATS[fmt]:
        fits = formats_for(kind)
        hint = f"use --format {' or '.join(fits)}" if fits else "no export format covers it"
        raise BackboneError(f"--format {fmt} exports {' and '.join(FORMATS[fmt])} models, but "
                            f"{source} holds a {kind} model: {hint}")  # fmt: skip
    return manifest


def check_target(source: Path, out_dir: str | Path, *, force: bool) -> Path:
    """The resolved target folder, if an export may be written there; else one line."""
    target = Path(out_dir).expanduser().resolve()
    if target == source or source in target.parents:
        raise ConfigError(f"--out {target} is inside the model folder {source}; pick a folder outside it")
    if target in source.parents:
        raise ConfigError(f"--out {target} holds the model folder {source}; pick a folder outside it")
    if target.exists() and not target.is_dir():
        raise ConfigError(f"--out {target} is a file; pick a folder")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise ConfigError(f"--out {target} exists and is not empty; pass --force to replace it")
    return target


def publish(model_folder: str | Path, out_dir: str | Path, fmt: str, write: Writer, *,
            force: bool = False) -> Path:  # fmt: skip
    """Check source and target, let `write(source, tmp)` create the export, rename it in."""
    source = Path(model_folder).expanduser().resolve()
    check_source(source, fmt)
    target = check_target(source, out_dir, force=force)
    try:
        with atomic_folder(target, replace=force) as tmp:  # with force, the old export is deleted
            write(source, tmp)
    except FileExistsError:
        raise ConfigError(f"--out {target} was filled meanwhile; pass --force to replace it") from None
    return target


def export_model(model_folder: str | Path, out_dir: str | Path, *, format: str,
                 force: bool = False, quantize: bool = False) -> Path:  # fmt: skip
    """Export a model folder as `format` ("hf", "onnx" or "savedmodel") to `out_dir`."""
    if quantize and format != "onnx":
        raise ConfigError(f"--quantize int8 applies to --format onnx only, got --format {format}")
    if format == "hf":
        from tl_ray.export.hf import write_hf as write
    elif format == "savedmodel":
        from tl_ray.export.savedmodel import write_savedmodel as write
    else:
        from tl_ray.export.onnx import export_onnx

        def write(source: Path, folder: Path) -> Path:
            return export_onnx(source, folder, quantize=quantize)

    return publish(model_folder, out_dir, format, write, force=force)


def listed_files(folder: str | Path) -> list[str]:
    """Every file under `folder`, as sorted POSIX paths relative to it."""
    root = Path(folder)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
