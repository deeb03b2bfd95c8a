"""keras-image: which layers train per phase and depth, weights files, image data, prediction.

Tiny real models (MobileNetV2 alpha 0.35 at 32x32, random or saved weights) and scikit-learn's
bundled digits; no Ray here (see tests/train/test_keras_training.py for the Ray runs).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from image_helpers import digits, png_bytes, write_image_folder

from tl_ray.backbones.registry import get_backbone
from tl_ray.config import DataConfig, KerasImageConfig, parse_config
from tl_ray.data import LabelMap
from tl_ray.errors import BackboneError, ConfigError, DataError
from tl_ray.images import decode_image, load_image_datasets

SMALL = dict(architecture="MobileNetV2", alpha=0.35, image_size=32)


def _backbone(**changes):
    return get_backbone(KerasImageConfig(**{**SMALL, **changes}))


@pytest.fixture(scope="module")
def model():
    return _backbone().build(num_labels=3)


def _kinds(backbone, model, names: set[str]) -> set[str]:
    """Which layer classes the named weights belong to (e.g. {'Conv2D', 'Dense'})."""
    owner = {v.name: type(layer).__name__ for layer in backbone.base_of(model).layers for v in layer.weights}
    return {owner.get(name, "head") for name in names}


def test_unit_count_table_matches_the_built_architectures():
    # units = weighted non-BatchNorm layers of the base (include_top=False)
    from tl_ray.backbones.keras_image import UNIT_COUNTS, _unit_names

    assert {arch: len(_unit_names(arch, 1.0)) for arch in UNIT_COUNTS} == UNIT_COUNTS
    assert len(_unit_names("MobileNetV2", 0.35)) == UNIT_COUNTS["MobileNetV2"]


@pytest.mark.parametrize("depth", [0, 1, 7, 52])
def test_frozen_batchnorm_never_trains_at_any_depth(model, depth):
    backbone = _backbone(unfreeze_depth=depth, batchnorm="frozen")
    backbone.set_phase(model, "head")
    assert backbone.trainable_names(model) == {"head/kernel:0", "head/bias:0"}
    backbone.set_phase(model, "finetune")
    trainable = backbone.trainable_names(model)
    base_layers = {name.split("/")[0] for name in trainable} - {"head"}
    assert len(base_layers) == depth  # exactly `depth` units, counted from the top
    assert "BatchNormalization" not in _kinds(backbone, model, trainable)
    if depth == 52:
        assert trainable == backbone.parameter_names(model)


def test_batchnorm_train_follows_its_unit(model):
    backbone = _backbone(unfreeze_depth=2, batchnorm="train")
    backbone.set_phase(model, "finetune")
    layers = {name.split("/")[0] for name in backbone.trainable_names(model)}
    assert layers == {"Conv_1", "Conv_1_bn", "block_16_project", "block_16_project_BN", "head"}
    assert _backbone().bn_trains and not _backbone(weights=None, batchnorm="frozen").bn_trains


def test_phases_split_the_epochs():
    cfg = parse_config({"data": {"path": "x"}, "train": {"epochs": 5},
                        "backbone": {"kind": "keras-image", "head_epochs": 2, "head_lr": 1e-3,
                                     "finetune_lr": 1e-5}})
    backbone = get_backbone(cfg.backbone)
    phases = [backbone.phase_of(epoch) for epoch in range(1, 6)]
    assert phases == ["head", "head", "finetune", "finetune", "finetune"]
    assert (backbone.learning_rate("head"), backbone.learning_rate("finetune")) == (1e-3, 1e-5)
    with pytest.raises(ConfigError, match=r"head_epochs \(6\) must be <= train.epochs \(5\)"):
        parse_config({"data": {"path": "x"}, "train": {"epochs": 5},
                      "backbone": {"kind": "keras-image", "head_epochs": 6}})


def test_bad_settings_fail_in_check(tmp_path):
    with pytest.raises(BackboneError, match="between 0 and 52"):
        _backbone(unfreeze_depth=53).check()
    with pytest.raises(BackboneError, match="alpha applies to MobileNetV2 only"):
        _backbone(architecture="VGG16", alpha=0.5).check()
    with pytest.raises(BackboneError, match="file not found"):
        _backbone(weights=str(tmp_path / "none.weights.h5")).check()
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(BackboneError, match=r"ending in \.weights\.h5"):
        _backbone(weights=str(tmp_path / "w.bin")).check()


def test_imagenet_offline_says_to_pass_a_file():
    try:
        _backbone(weights="imagenet", image_size=96).build(num_labels=2)
    except BackboneError as error:
        assert "pass a local weights file" in str(error)
    else:
        pytest.skip("this machine is online: the imagenet weights downloaded")


def test_weights_files_load_into_the_base(model, tmp_path):
    source = _backbone().base_of(model)
    for v in source.weights:  # recognisable weights
        v.assign(np.full(v.shape, 0.01, np.float32) + np.random.default_rng(0).random(v.shape) * 1e-3)
    source.save_weights(str(tmp_path / "base.weights.h5"))
    expected = source.get_weights()
    loaded = _backbone(weights=str(tmp_path / "base.weights.h5"))
    assert loaded.bn_trains is False  # pretrained: BatchNorm frozen by default
    new = loaded.build(num_labels=5)
    assert all(np.array_equal(a, b) for a, b in zip(loaded.base_of(new).get_weights(), expected))
    model.save(str(tmp_path / "whole.keras"))  # a whole classifier: its nested base is used
    from_keras = _backbone(weights=str(tmp_path / "whole.keras")).build(num_labels=2)
    assert all(np.array_equal(a, b)
               for a, b in zip(_backbone().base_of(from_keras).get_weights(), expected))
    with pytest.raises(BackboneError, match="does not fit MobileNetV2"):
        _backbone(alpha=0.5, weights=str(tmp_path / "base.weights.h5")).build(num_labels=2)


def test_predictor_on_a_checkpoint_folder_matches_the_model(model, tmp_path):
    from tl_ray.serve.predictor import Predictor
    from tl_ray.train.checkpoint import write_model_folder

    backbone = _backbone()
    folder = tmp_path / "model"
    folder.mkdir()
    write_model_folder(folder, backbone, model, LabelMap(("0", "1", "2")), metrics={}, epoch=1,
                       extra={"image_size": 32})
    rows = digits((0, 1), 2)
    images = [png_bytes(pixels) for pixels, _ in rows]
    predictor = Predictor(folder)
    assert predictor.input_kind == "image"
    expected = backbone.scores(model, backbone.preprocess(images))
    np.testing.assert_allclose(predictor.scores(images), expected, rtol=1e-5, atol=1e-7)
    answers = predictor.predict(images)
    assert [a["label"] for a in answers] == [str(i) for i in expected.argmax(1)]
    assert abs(sum(answers[0]["probabilities"].values()) - 1) < 1e-6


# ---------------------------------------------------------------- image data


def test_folder_loads_split_and_encoded(tmp_path):
    write_image_folder(tmp_path / "imgs", digits((3, 7), 10))
    ds = load_image_datasets(DataConfig(path=str(tmp_path / "imgs"), validation_split=0.2), seed=0)
    assert ds.labels.labels == ("3", "7")
    assert (ds.train.num_rows, ds.validation.num_rows) == (16, 4)
    assert ds.train.column_names == ["image", "label"]
    assert decode_image(ds.train.column("image")[0].as_py(), 32).shape == (32, 32, 3)


def test_tables_of_bytes_or_paths(tmp_path):
    rows = digits((1, 2), 4)
    pq.write_table(pa.table({"img": [png_bytes(p) for p, _ in rows], "y": [l for _, l in rows]}),
                   tmp_path / "t.parquet")
    ds = load_image_datasets(DataConfig(path=str(tmp_path / "t.parquet"), image_column="img",
                                        label_column="y", validation_split=0.5))
    assert ds.labels.labels == ("1", "2") and ds.train.num_rows + ds.validation.num_rows == 8
    write_image_folder(tmp_path / "files", rows)
    lines = ["path,label"] + [f"files/{l}/{i:04d}.png,{l}" for i, (_, l) in enumerate(rows)]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    ds = load_image_datasets(DataConfig(path=str(tmp_path / "t.csv"), image_column="path"))
    assert ds.train.num_rows + ds.validation.num_rows == 8


def test_image_data_errors_are_one_clear_line(tmp_path):
    def fails(match: str, **data) -> None:
        with pytest.raises(DataError, match=match):
            load_image_datasets(DataConfig(**data))

    fails("image folder or table not found", path=str(tmp_path / "nope"))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    fails(r"no images \(.png.*in class sub-folders", path=str(tmp_path / "empty"))
    write_image_folder(tmp_path / "one", digits((4,), 3))
    fails("only one class sub-folder with images", path=str(tmp_path / "one"))
    write_image_folder(tmp_path / "bad", digits((4, 5), 3))
    (tmp_path / "bad" / "5" / "broken.png").write_bytes(b"not a png")
    fails(r"bad/5/broken.png: cannot decode image", path=str(tmp_path / "bad"))
    pq.write_table(pa.table({"x": [b"1"], "label": ["a"]}), tmp_path / "t.parquet")
    fails("column 'img' not found", path=str(tmp_path / "t.parquet"), image_column="img")
    fails("is not a folder of class sub-folders", path=str(tmp_path / "t.parquet"))


def test_tl_ray_and_the_torch_paths_do_not_import_tensorflow():
    # the driver of a keras-image run validates its config without TensorFlow too
    code = ("import sys, tl_ray, tl_ray.train.driver, tl_ray.serve.predictor, tl_ray.images, "
            "tl_ray.train.keras_loop; from tl_ray.backbones.registry import get_backbone; "
            "from tl_ray.config import KerasImageConfig; "
            "get_backbone(KerasImageConfig(unfreeze_depth=3)).check(); "
            "assert 'tensorflow' not in sys.modules, 'tensorflow loaded'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_shipped_search_space_validates_against_a_keras_config():
    from tl_ray.search.space import load_space, validate_against

    space = load_space(Path(__file__).resolve().parents[2] / "search_spaces" / "keras-image.yaml")
    base = parse_config({"data": {"path": "imgs"}, "train": {"epochs": 3},
                         "backbone": {"kind": "keras-image", "alpha": 0.35, "image_size": 32}})
    validate_against(space, base, max_depth=get_backbone(base.backbone).num_layers())
    vgg = parse_config({"data": {"path": "imgs"}, "train": {"epochs": 3},
                        "backbone": {"kind": "keras-image", "architecture": "VGG16"}})
    with pytest.raises(ConfigError, match="high=52 exceeds the backbone's 13 layers"):
        validate_against(space, vgg, max_depth=get_backbone(vgg.backbone).num_layers())
    short = parse_config({"data": {"path": "imgs"}, "train": {"epochs": 1},
                          "backbone": {"kind": "keras-image"}})
    with pytest.raises(ConfigError, match="head_epochs"):
        validate_against(space, short, max_depth=52)


def test_head_phase_trains_on_cached_pooled_features_with_the_same_logits(model):
    backbone = _backbone(head_dropout=0.0)
    backbone.set_phase(model, "head")
    assert backbone.head_cacheable(model)
    pixels = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    features = backbone.pooled_features(model, pixels, batch_size=4)  # two batches
    head = backbone.head_model(model)
    assert features.shape == (6, model.get_layer("pool").output_shape[-1])
    np.testing.assert_allclose(
        np.asarray(head(features, training=False)),
        backbone.scores(model, backbone.preprocess_pixels(pixels)),
        rtol=1e-4, atol=1e-5,
    )
    assert {w.name for w in head.trainable_weights} <= backbone.trainable_names(model)  # shared head


def test_augmentation_turns_the_head_phase_cache_off():
    backbone = _backbone(augment=True)
    assert not backbone.head_cacheable(backbone.build(num_labels=2))
