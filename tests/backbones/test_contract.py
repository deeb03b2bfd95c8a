"""The Backbone contract, run over every registered backbone family on a tiny model.

Add a family by adding a factory to TINY: it returns the family's config at a given depth.
Framework-neutral: which parameters train comes from the backbone's `trainable_names` /
`parameter_names` hooks, predictions from `scores` (NumPy), inputs from `_raw_inputs`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tl_ray.backbones.registry import get_backbone, registered_kinds
from tl_ray.config import HFTextConfig, KerasImageConfig, WordVectorsConfig
from tl_ray.errors import BackboneError

TEXTS = ["a good film", "a bad film", "so so"]


@pytest.fixture
def tiny(tiny_bert, tiny_vectors):
    return {
        "hf-text": lambda depth: HFTextConfig(name_or_path=tiny_bert, unfreeze_depth=depth),
        "word-vectors": lambda depth: WordVectorsConfig(vectors=tiny_vectors, unfreeze_depth=depth),
        # VGG16: 13 units, so building one model per depth stays cheap (MobileNetV2 has 52)
        "keras-image": lambda depth: KerasImageConfig(
            architecture="VGG16", image_size=32, unfreeze_depth=depth
        ),
    }


def _raw_inputs(backbone) -> list:
    """What `preprocess` takes: texts, or for image families three small PNG-able arrays."""
    if backbone.input_kind == "image":
        rng = np.random.default_rng(0)
        return [rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8) for _ in range(3)]
    return TEXTS


def _eval(model):
    return model.eval() if hasattr(model, "eval") else model  # torch: inference mode


@pytest.mark.parametrize("kind", registered_kinds())
def test_every_registered_kind_has_a_tiny_factory(kind, tiny):
    assert kind in tiny, f"add a tiny config factory for backbone kind {kind!r} to TINY"


@pytest.mark.parametrize("kind", registered_kinds())
def test_deeper_unfreezing_trains_a_superset(kind, tiny):
    layers = get_backbone(tiny[kind](0)).num_layers()
    previous: set[str] = set()
    for depth in range(layers + 1):
        backbone = get_backbone(tiny[kind](depth))
        model = backbone.build(num_labels=3)
        backbone.apply_unfreeze(model)
        trainable = backbone.trainable_names(model)
        assert trainable > previous or (depth == 0 and trainable), (kind, depth)
        previous = trainable
    assert previous == backbone.parameter_names(model)  # full depth trains everything it can


@pytest.mark.parametrize("kind", registered_kinds())
def test_depth_beyond_the_layer_count_fails_early(kind, tiny):
    layers = get_backbone(tiny[kind](0)).num_layers()
    with pytest.raises(BackboneError, match=str(layers)):
        get_backbone(tiny[kind](layers + 1)).check()


@pytest.mark.parametrize("kind", registered_kinds())
def test_save_load_round_trip_predicts_the_same(kind, tiny, tmp_path: Path):
    backbone = get_backbone(tiny[kind](1))
    torch.manual_seed(0)
    model = _eval(backbone.build(num_labels=3))
    backbone.save(model, tmp_path)
    loaded = _eval(backbone.load(tmp_path, num_labels=3))
    inputs = backbone.preprocess(_raw_inputs(backbone), 16)
    expected, got = backbone.scores(model, inputs), backbone.scores(loaded, inputs)
    assert expected.shape == (3, 3)
    scale = max(float(np.abs(expected).max()), 1e-30)  # compare relative to the logits' size
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * scale)
