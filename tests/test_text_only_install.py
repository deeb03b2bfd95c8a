"""A text-only install: `pip install 'tl-ray[text]'` into a fresh venv, with no TensorFlow,
tf_keras, Keras or gensim in it, imports every module the hf-text path uses, trains and
predicts with an hf-text model (its Ray workers run in that venv too), and names the extra to
install when a run asks for another backbone family.

A top-level `import tensorflow` (or gensim) anywhere on that path fails this test: the
library is not there to import. Building the venv takes about 1.5 minutes here (local wheels).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import make_sentiment_rows, write_csv

ROOT = Path(__file__).resolve().parents[1]
NOT_INSTALLED = ("tensorflow", "tf_keras", "keras", "gensim")
# Backbone-family modules: they may import their own library; the registry loads them on use.
FAMILY_MODULES = {
    "tl_ray.backbones.keras_image", "tl_ray.train.keras_loop", "tl_ray.images",
    "tl_ray.backbones.word_vectors", "tl_ray.backbones.word_vectors_io", "tl_ray.w2v",
}  # fmt: skip

IMPORT_CHECK = """
import importlib, importlib.util, json, pkgutil, sys
import tl_ray
family = set(sys.argv[1].split(","))
modules = [m.name for m in pkgutil.walk_packages(tl_ray.__path__, "tl_ray.")
           if m.name not in family and m.name != "tl_ray.__main__"]  # __main__ runs the CLI
for name in modules:
    importlib.import_module(name)
print(json.dumps({
    "file": tl_ray.__file__,
    "imported": len(modules),
    "installed": [m for m in sys.argv[2].split(",") if importlib.util.find_spec(m) is not None],
    "loaded": sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[2].split(","))),
}))
"""

# `tl-ray train` on an embedded local Ray sized for this machine (as tests/conftest.py starts it).
TRAIN = """
import sys
from tl_ray.train.driver import ensure_ray
ensure_ray(num_cpus=2)
from tl_ray.cli.app import main
sys.exit(main(["train", sys.argv[1]]))
"""


@pytest.fixture(scope="module")
def text_venv(tmp_path_factory) -> Path:
    """A fresh venv holding tl-ray[text] (installed from a copy of this checkout, pinned)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "constraints.txt"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "tl_ray", src / "tl_ray", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c", "constraints.txt", ".[text]"],
        cwd=src, capture_output=True, text=True, timeout=900, env=clean_env(),
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    return venv


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(venv: Path, args: list[str], cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    """A command of the venv (`python` or `tl-ray`), run outside the checkout."""
    exe = str(venv / "bin" / args[0])
    return subprocess.run([exe, *args[1:]], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=clean_env())  # fmt: skip


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.slow
def test_text_only_venv_has_no_tensorflow_or_gensim_and_imports_every_module(text_venv, tmp_path):
    result = run(text_venv, ["python", "-c", IMPORT_CHECK, ",".join(FAMILY_MODULES),
                             ",".join(NOT_INSTALLED)], cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(report["file"]).is_relative_to(text_venv), f"tl_ray from {report['file']}, not the venv"
    assert report["installed"] == [] and report["loaded"] == [], report
    assert report["imported"] >= 30, report  # the CLI, train, search, serve and hf-text modules
    help_ = run(text_venv, ["tl-ray", "--help"], cwd=tmp_path)
    assert help_.returncode == 0 and "train" in help_.stdout, help_.stderr


@pytest.mark.slow
def test_text_only_venv_trains_and_predicts_hf_text(text_venv, tiny_bert, tmp_path):
    write_csv(tmp_path / "data.csv", make_sentiment_rows(64))
    (tmp_path / "run.yaml").write_text(
        "data: {path: data.csv}\n"
        f"backbone: {{kind: hf-text, name_or_path: {tiny_bert}, unfreeze_depth: 1}}\n"
        "train: {epochs: 1, batch_size: 16, max_length: 16, num_workers: 1, cache: false}\n"
        "output: out\n",
        encoding="utf-8",
    )
    result = run(text_venv, ["python", "-c", TRAIN, "run.yaml"], cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    model = Path(json.loads(result.stdout.strip().splitlines()[-1])["model"])
    manifest = json.loads((model / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["backbone"]["kind"] == "hf-text" and manifest["epoch"] == 1
    assert not {"tensorflow", "tensorflow-cpu", "gensim"} & set(manifest["versions"]), manifest["versions"]
    predicted = run(text_venv, ["tl-ray", "predict", str(model), "--text", "a wonderful film"], cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert json.loads(predicted.stdout.splitlines()[0])["label"] in ("pos", "neg")


KERAS = "pip install 'tl-ray[keras]' (or 'tl-ray[keras-gpu]' on GPU nodes)"
WORD_VECTORS = "pip install 'tl-ray[word-vectors]'"


@pytest.mark.slow
@pytest.mark.parametrize(
    "backbone, command, install",
    [
        ("{kind: keras-image, architecture: MobileNetV2, weights: null}", ["train", "run.yaml"], KERAS),
        ("{kind: keras-image, architecture: MobileNetV2, weights: null}",
         ["tune", "run.yaml", "--space", str(ROOT / "search_spaces" / "keras-image.yaml")], KERAS),
        ("{kind: word-vectors, vectors: vectors.vec}", ["train", "run.yaml"], WORD_VECTORS),
        ("{kind: word-vectors, vectors: vectors.vec}", ["w2v", "eval", "vectors.vec"], WORD_VECTORS),
        ("{kind: word-vectors, vectors: vectors.vec}", ["w2v", "train", "data.csv", "--out", "w.model"],
         WORD_VECTORS),
    ],
)  # fmt: skip
def test_other_families_name_their_extra_in_one_line(text_venv, tmp_path, backbone, command, install):
    write_csv(tmp_path / "data.csv", make_sentiment_rows(40))
    (tmp_path / "vectors.vec").write_text("2 2\ngood 1 0\nbad 0 1\n", encoding="utf-8")
    (tmp_path / "run.yaml").write_text(f"data: {{path: data.csv}}\nbackbone: {backbone}\noutput: out\n")
    line = one_error_line(run(text_venv, ["tl-ray", *command], cwd=tmp_path))
    assert line.endswith(f"needs {'TensorFlow' if 'keras' in install else 'gensim'}: {install}"), line


def test_a_core_only_install_names_the_text_extra(monkeypatch):
    """Without transformers (a core-only install) hf-text fails in one line naming `text`."""
    import importlib.util

    from tl_ray.backbones.registry import get_backbone
    from tl_ray.config import parse_config
    from tl_ray.errors import BackboneError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))  # fmt: skip
    cfg = parse_config({"data": {"path": "d.csv"}, "backbone": {"kind": "hf-text", "name_or_path": "x"}})
    with pytest.raises(BackboneError, match=r"^backbone kind hf-text needs transformers and peft: "
                                            r"pip install 'tl-ray\[text\]'$"):  # fmt: skip
        get_backbone(cfg.backbone)
