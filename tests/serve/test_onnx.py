"""The ONNX runtime (issue 15, item 3): export a torch model folder, run it with onnxruntime.

Tiny models only: the 2-layer BERT (`tiny_bert`, cls and mean pooling, LoRA merged) and word
vectors trained here in a second (cnn with subword OOV rows, mean, bilstm). Each export costs
a few seconds, so every folder is exported once per module and shared.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tl_ray.errors import BackboneError, ConfigError, TLRayError
from tl_ray.export import export_onnx, is_onnx_export
from tl_ray.serve.predictor import Predictor

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# Different lengths in one batch (padding), an empty text, and words no vocabulary holds.
TEXTS = [
    "A gripping, funny and thoroughly moving film.",
    "dull",
    "",
    "The plot is tedious, the actors are weak, and the story never finds its qzxvjk rhythm "
    "in spite of a charming score.",
    "great",
]
HF = {"cls": {"pooling": "cls"}, "mean": {"pooling": "mean"}, "lora": {"pooling": "mean", "mode": "lora"}}
WV = {"wv-cnn": {"encoder": "cnn", "oov": "subword"}, "wv-mean": {"encoder": "mean", "oov": "zero"},
      "wv-bilstm": {"encoder": "bilstm", "oov": "learned"}}  # fmt: skip


def _write(folder: Path, backbone, model) -> Path:
    from tl_ray.data import LabelMap
    from tl_ray.train.checkpoint import write_model_folder

    folder.mkdir(parents=True)
    write_model_folder(folder, backbone, model, LabelMap(("neg", "pos", "mixed")),
                       metrics={}, epoch=1, extra={"max_length": 48})  # fmt: skip
    return folder


def _hf_folder(folder: Path, tiny_bert: str, options: dict) -> Path:
    from tl_ray.backbones.registry import get_backbone
    from tl_ray.config import HFTextConfig

    torch.manual_seed(7)
    backbone = get_backbone(HFTextConfig(name_or_path=tiny_bert, unfreeze_depth=1, **options))
    model = backbone.build(3)
    with torch.no_grad():  # non-trivial adapters (LoRA B starts at zero) and head
        for name, param in model.named_parameters():
            if "lora_B" in name or name.startswith("classifier."):
                param.add_(0.3 * torch.randn_like(param))
    return _write(folder, backbone, model)


def _wv_folder(folder: Path, vectors: str, options: dict) -> Path:
    from tl_ray.backbones.registry import get_backbone
    from tl_ray.config import WordVectorsConfig

    torch.manual_seed(7)
    backbone = get_backbone(WordVectorsConfig(vectors=vectors, cnn_filters=[2, 3], cnn_maps=4,
                                              lstm_hidden=6, **options))  # fmt: skip
    return _write(folder, backbone, backbone.build(3))


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_bert, tiny_vectors):
    """name -> model folder, built on first use (each in its own parent: its own cache)."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            folder = tmp_path_factory.mktemp(name) / "model"
            built[name] = (_hf_folder(folder, tiny_bert, HF[name]) if name in HF
                           else _wv_folder(folder, tiny_vectors, WV[name]))  # fmt: skip
        return built[name]

    return get


@pytest.mark.parametrize("name", [*HF, *WV])
def test_onnx_scores_match_torch_on_a_padded_batch(folders, name):
    folder = folders(name)
    native, onnx = Predictor(folder, device="cpu"), Predictor(folder, runtime="onnx")
    expected, got = native.scores(TEXTS), onnx.scores(TEXTS)
    assert got.shape == (len(TEXTS), 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    np.testing.assert_allclose(onnx.scores(TEXTS[3:4]), expected[3:4], rtol=0, atol=1e-4)  # alone
    assert [p["label"] for p in onnx.predict(TEXTS)] == [p["label"] for p in native.predict(TEXTS)]
    truth = [0, 1, 2, 0, 1]
    assert onnx.evaluate(TEXTS, truth) == pytest.approx(native.evaluate(TEXTS, truth), abs=1e-4)
    assert onnx.onnx_folder.parent == folder.parent / ".onnx"  # a sibling: the source is untouched
    assert not (folder / ".onnx").exists()


def test_the_onnxruntime_session_computes_the_scores(folders):
    """No silent torch fallback: the model is a session, and what it returns is what we get."""
    import onnxruntime as ort

    predictor = Predictor(folders("cls"), runtime="onnx")
    assert isinstance(predictor.model.session, ort.InferenceSession)
    assert not isinstance(predictor.model, torch.nn.Module)
    assert predictor.model.providers == ["CPUExecutionProvider"] and predictor.device == "cpu"
    assert predictor.runtime == "onnx" and predictor.input_kind == "text"
    real, fed = predictor.model.session, []

    def run(outputs, feed):
        fed.append(feed)
        return [np.full((len(feed["input_ids"]), 3), 0.5, np.float32)]

    predictor.model.session = SimpleNamespace(run=run, get_providers=real.get_providers)
    assert np.array_equal(predictor.scores(TEXTS), np.full((5, 3), 0.5, np.float32))
    assert sorted(fed[0]) == sorted(i.name for i in real.get_inputs())
    assert all(isinstance(v, np.ndarray) and v.dtype == np.int64 for v in fed[0].values())


def test_session_threads_follow_torch(folders):
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            options = Predictor(folders("cls"), runtime="onnx").model.session.get_session_options()
            assert options.intra_op_num_threads == threads
    finally:
        torch.set_num_threads(before)


def test_export_folder_is_self_contained_and_runs_as_it_is(folders, tmp_path):
    source = folders("wv-cnn")
    out = export_onnx(source, tmp_path / "exported")
    assert is_onnx_export(out) and not list(tmp_path.glob(".*tmp"))
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "labels.json", "manifest.json", "word_vectors.json", "ngrams.safetensors"} <= names
    moved = shutil.move(str(out), str(tmp_path / "elsewhere"))  # needs nothing from the source
    predictor = Predictor(moved, runtime="onnx")
    assert predictor.manifest["onnx"]["inputs"] == ["input_ids", "oov_vectors"]
    assert predictor.onnx_folder == Path(moved)
    np.testing.assert_allclose(predictor.scores(TEXTS), Predictor(source).scores(TEXTS), atol=1e-4)
    again = export_onnx(source, moved)  # an earlier export is replaced
    assert is_onnx_export(again)
    with pytest.raises(ConfigError, match="runtime 'onnx'"):
        Predictor(moved)  # the torch runtime cannot read an export


def test_cached_export_is_reused_and_two_loads_at_once_export_once(folders, tmp_path, monkeypatch):
    import tl_ray.export.onnx as onnx_module

    source = tmp_path / "model"
    shutil.copytree(folders("mean"), source)
    real, calls = onnx_module._write_export, []

    def counted(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(onnx_module, "_write_export", counted)
    loaded: list[Predictor] = []
    threads = [threading.Thread(target=lambda: loaded.append(Predictor(source, runtime="onnx")))
               for _ in range(2)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(loaded) == 2 and len(calls) == 1
    assert loaded[0].onnx_folder == loaded[1].onnx_folder
    assert [p.name for p in (tmp_path / ".onnx").iterdir()] == [loaded[0].onnx_folder.name]
    Predictor(source, runtime="onnx")
    assert len(calls) == 1  # cached
    (source / "labels.json").write_text('{"labels": ["a", "b", "c"]}\n', encoding="utf-8")
    assert Predictor(source, runtime="onnx").labels.labels == ("a", "b", "c")  # changed: re-exported
    assert len(calls) == 2


def test_int8_runtime_quantizes_the_matrix_products(folders):
    import onnx

    folder = folders("cls")
    native, int8 = Predictor(folder), Predictor(folder, runtime="onnx-int8")
    assert int8.onnx_folder.name.endswith("-int8") and int8.model.quantization == "dynamic-int8"
    ops = {node.op_type for node in onnx.load(str(int8.onnx_folder / "model.onnx")).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    np.testing.assert_allclose(int8.scores(TEXTS), native.scores(TEXTS), atol=0.1)
    with pytest.raises(ConfigError, match="onnx-int8 export"):
        Predictor(int8.onnx_folder, runtime="onnx")


# -- what is refused, in one line ------------------------------------------------------------
def _one_line(error: pytest.ExceptionInfo) -> str:
    assert isinstance(error.value, TLRayError) and "\n" not in str(error.value)
    return str(error.value)


def test_a_keras_folder_is_refused(tmp_path):
    from tl_ray.data import LabelMap
    from tl_ray.io import write_json_atomic

    folder = tmp_path / "keras"
    folder.mkdir()
    write_json_atomic(folder / "manifest.json", {"format_version": 1, "backbone": {"kind": "keras-image"}})
    LabelMap(("a", "b")).save(folder / "labels.json")
    for call in (lambda: export_onnx(folder, tmp_path / "out"), lambda: Predictor(folder, runtime="onnx")):
        with pytest.raises(BackboneError) as error:
            call()
        assert _one_line(error).startswith("ONNX export covers torch models")
    assert not (tmp_path / "out").exists()


def test_unknown_runtime_and_missing_onnxruntime(folders, monkeypatch):
    with pytest.raises(ConfigError) as error:
        Predictor(folders("cls"), runtime="tensorrt")
    assert "runtime must be one of torch, onnx, onnx-int8, got 'tensorrt'" in _one_line(error)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="sees no CUDA GPU"):
            Predictor(folders("cls"), runtime="onnx", device="cuda")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real(name, *a))  # fmt: skip
    with pytest.raises(ConfigError) as error:
        Predictor(folders("cls"), runtime="onnx")
    assert "pip install 'tl-ray[onnx]'" in _one_line(error)


def test_export_targets_overlapping_the_source_or_other_folders_are_refused(folders, tmp_path):
    source = folders("cls")
    before = sorted(p.name for p in source.iterdir())
    for target in (source, source / "onnx", source.parent):
        with pytest.raises(ConfigError) as error:
            export_onnx(source, target)
        assert "overlaps the model folder" in _one_line(error)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(ConfigError, match="not an ONNX export"):
        export_onnx(source, other)
    assert (other / "keep.txt").read_text(encoding="utf-8") == "mine"
    assert sorted(p.name for p in source.iterdir()) == before


def test_a_read_only_parent_caches_under_the_user_cache(folders, tmp_path, monkeypatch):
    import tl_ray.export.onnx as onnx_module

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(onnx_module, "_writable", lambda parent, root: False)  # root writes anyway
    source = folders("wv-mean")
    predictor = Predictor(source, runtime="onnx")
    assert predictor.onnx_folder.parent == tmp_path / "cache" / "tl-ray" / "onnx"
    np.testing.assert_allclose(predictor.scores(TEXTS), Predictor(source).scores(TEXTS), atol=1e-4)


def test_a_serve_replica_loads_the_runtime_its_args_name(folders):
    """ServeArgs.runtime reaches the replica's Predictor, and /v1/model reports it."""
    from tl_ray.serve.api import ModelSlot, ServeArgs
    from tl_ray.serve.app import _load, replica_placement

    folder = folders("cls")
    placement = replica_placement(ServeArgs(runtime="onnx"), {"CPU": 1.0}, [])
    loaded = _load(ModelSlot(model=str(folder)), placement)
    assert loaded.info.runtime == "onnx" and loaded.predictor.runtime == "onnx"
    torch_scores = Predictor(folder).scores(TEXTS)
    assert np.abs(loaded.predictor.scores(TEXTS) - torch_scores).max() < 1e-4
    with pytest.raises(ValueError, match="runtime must be one of torch, onnx, onnx-int8"):
        ServeArgs(runtime="tensorrt")
