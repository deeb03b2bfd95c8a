"""The Backbone contract, run over every registered backbone family on a tiny model.

Add a family by adding a factory to TINY: it returns the family's config at a given depth.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tl_ray.backbones.registry import get_backbone, registered_kinds
from tl_ray.config import HFTextConfig, WordVectorsConfig
from tl_ray.errors import BackboneError

TEXTS = ["a good film", "a bad film", "so so"]


@pytest.fixture
def tiny(tiny_bert, tiny_vectors):
    return {
        "hf-text": lambda depth: HFTextConfig(name_or_path=tiny_bert, unfreeze_depth=depth),
        "word-vectors": lambda depth: WordVectorsConfig(vectors=tiny_vectors, unfreeze_depth=depth),
    }


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
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable > previous or (depth == 0 and trainable), (kind, depth)
        previous = trainable
    assert previous == {n for n, _ in model.named_parameters()}  # full depth trains everything


@pytest.mark.parametrize("kind", registered_kinds())
def test_depth_beyond_the_layer_count_fails_early(kind, tiny):
    layers = get_backbone(tiny[kind](0)).num_layers()
    with pytest.raises(BackboneError, match=str(layers)):
        get_backbone(tiny[kind](layers + 1)).check()


@pytest.mark.parametrize("kind", registered_kinds())
def test_save_load_round_trip_predicts_the_same(kind, tiny, tmp_path: Path):
    backbone = get_backbone(tiny[kind](1))
    torch.manual_seed(0)
    model = backbone.build(num_labels=3).eval()
    backbone.save(model, tmp_path)
    loaded = backbone.load(tmp_path, num_labels=3).eval()
    inputs = backbone.preprocess(TEXTS, 16)
    with torch.no_grad():
        assert torch.allclose(backbone.logits(model, inputs), backbone.logits(loaded, inputs), atol=1e-6)
