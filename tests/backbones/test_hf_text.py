"""hf-text backbone: which parameters train at each depth, LoRA, lr decay, loading errors."""

from __future__ import annotations

import pytest
import torch

from tl_ray.backbones.hf_text import HFTextBackbone, resolve_model_path
from tl_ray.backbones.registry import get_backbone
from tl_ray.config import HFTextConfig
from tl_ray.errors import BackboneError

LAYERS = 2


def expected_trainable(name: str, depth: int, pooling: str) -> bool:
    """The spec, written independently of the implementation."""
    if name.startswith("classifier."):
        return True
    if name.startswith("encoder.pooler."):
        return depth >= 1 and pooling == "cls"
    if name.startswith("encoder.embeddings."):
        return depth == LAYERS
    layer = int(name.split("encoder.encoder.layer.")[1].split(".")[0])
    return layer >= LAYERS - depth


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("depth", range(LAYERS + 1))
def test_one_step_changes_exactly_the_unfrozen_tensors(tiny_bert, depth, pooling):
    backbone = get_backbone(
        HFTextConfig(name_or_path=tiny_bert, unfreeze_depth=depth, pooling=pooling)
    )
    torch.manual_seed(0)
    model = backbone.build(num_labels=3)
    backbone.apply_unfreeze(model)
    names = dict(model.named_parameters())
    assert {n for n, p in names.items() if p.requires_grad} == {
        n for n in names if expected_trainable(n, depth, pooling)
    }
    before = {n: p.detach().clone() for n, p in names.items()}
    optimizer = torch.optim.AdamW(backbone.param_groups(model, 1e-2, 0.01))
    model.train()
    inputs = backbone.preprocess(["a good film", "a bad film", "so so"], 16)
    loss = torch.nn.functional.cross_entropy(backbone.logits(model, inputs), torch.tensor([0, 1, 2]))
    loss.backward()
    optimizer.step()
    for name, param in names.items():
        changed = not torch.equal(before[name], param.detach())
        assert changed == expected_trainable(name, depth, pooling), name


def test_full_depth_is_the_default(tiny_bert):
    backbone = get_backbone(HFTextConfig(name_or_path=tiny_bert))
    model = backbone.build(num_labels=2)
    backbone.apply_unfreeze(model)
    assert all(p.requires_grad for p in model.parameters())


def test_lr_decay_shrinks_lower_layers(tiny_bert):
    backbone = get_backbone(HFTextConfig(name_or_path=tiny_bert, unfreeze_depth=LAYERS))
    model = backbone.build(num_labels=2)
    backbone.apply_unfreeze(model)
    groups = backbone.param_groups(model, lr=1.0, weight_decay=0.1, lr_decay=0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["classifier.weight"])] == 1.0
    assert lr_of[id(named["encoder.encoder.layer.1.output.dense.weight"])] == 0.5
    assert lr_of[id(named["encoder.encoder.layer.0.output.dense.weight"])] == 0.25
    assert lr_of[id(named["encoder.embeddings.word_embeddings.weight"])] == 0.125
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay_of[id(named["classifier.bias"])] == 0.0
    assert decay_of[id(named["classifier.weight"])] == 0.1


def test_lora_trains_adapters_in_top_layers_and_head(tiny_bert):
    backbone = get_backbone(HFTextConfig(name_or_path=tiny_bert, mode="lora", unfreeze_depth=1))
    model = backbone.build(num_labels=2)
    backbone.apply_unfreeze(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_" in n and "layer.1." in n for n in trainable)
    assert not any("lora_" in n and "layer.0." in n for n in trainable)
    assert any("classifier" in n for n in trainable)
    assert all("lora_" in n or "classifier" in n for n in trainable)


def test_depth_beyond_layer_count_is_rejected(tiny_bert):
    backbone = get_backbone(HFTextConfig(name_or_path=tiny_bert, unfreeze_depth=LAYERS + 1))
    with pytest.raises(BackboneError, match="between 0 and 2"):
        backbone.build(num_labels=2)


def test_lora_needs_depth_at_least_one(tiny_bert):
    backbone = get_backbone(HFTextConfig(name_or_path=tiny_bert, mode="lora", unfreeze_depth=0))
    with pytest.raises(BackboneError, match=">= 1 with mode: lora"):
        backbone.build(num_labels=2)


def test_minilm_alias_resolves_to_the_bundled_folder(minilm_path):
    assert resolve_model_path("minilm") == minilm_path


def test_pooling_auto_is_mean_for_sentence_transformers(minilm_path, tiny_bert):
    assert get_backbone(HFTextConfig(name_or_path="minilm")).pooling == "mean"
    assert get_backbone(HFTextConfig(name_or_path=tiny_bert)).pooling == "cls"


@pytest.mark.parametrize("mode", ["finetune", "lora"])
def test_save_load_round_trip_gives_identical_logits(tiny_bert, tmp_path, mode):
    backbone = get_backbone(
        HFTextConfig(name_or_path=tiny_bert, unfreeze_depth=1, mode=mode, pooling="mean")
    )
    model = backbone.build(num_labels=3)
    with torch.no_grad():  # make the adapters and head non-trivial before saving
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    backbone.save(model, tmp_path)
    loaded = backbone.load(tmp_path, num_labels=3)
    inputs = backbone.preprocess(["a good film", "a bad one"], 16)
    model.eval(), loaded.eval()
    assert loaded.pooling == "mean"
    assert torch.allclose(backbone.logits(model, inputs), backbone.logits(loaded, inputs), atol=1e-6)


def test_hub_id_fails_offline_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    backbone = HFTextBackbone(HFTextConfig(name_or_path="no-such-org/no-such-model"))
    with pytest.raises(BackboneError, match="HF_HUB_OFFLINE=1"):
        backbone.build(num_labels=2)


def test_missing_local_folder_is_named():
    with pytest.raises(BackboneError, match="folder not found: ./nowhere"):
        resolve_model_path("./nowhere")


def test_unknown_kind_lists_valid_kinds():
    class Fake:
        kind = "resnet-9000"

    with pytest.raises(BackboneError, match="valid kinds: hf-text"):
        get_backbone(Fake())


@pytest.fixture(scope="module")
def bert_without_pooler(tmp_path_factory, tiny_bert) -> str:
    """A checkpoint with no pooler weights (like roberta-base): loading adds a new pooler."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("no-pooler")
    torch.manual_seed(0)
    BertModel(BertConfig.from_pretrained(tiny_bert), add_pooling_layer=False).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(folder)
    return str(folder)


def test_weights_missing_from_the_checkpoint_are_the_same_in_every_process(bert_without_pooler):
    """The cache task and the training workers build the model separately; a pooler the
    checkpoint lacks must come out the same in each, or cached depth-0 features come from
    another pooler than the one that trains and ships."""
    backbone = get_backbone(HFTextConfig(name_or_path=bert_without_pooler, unfreeze_depth=0))
    torch.manual_seed(123)
    torch.rand(7)  # a cache task: whatever the RNG did before
    cache_side = backbone.build(num_labels=2)
    torch.manual_seed(0)  # a training worker: train.seed, then build
    worker_side = backbone.build(num_labels=2)
    pooler = {k: v for k, v in cache_side.state_dict().items() if "pooler" in k}
    assert pooler, "the encoder should have a (new) pooler"
    assert all(torch.equal(v, worker_side.state_dict()[k]) for k, v in pooler.items())
    for model in (cache_side, worker_side):
        backbone.apply_unfreeze(model)
        model.eval()
    inputs = backbone.preprocess(["a fine film", "dull"], 16)
    assert backbone.prefix_cache() == "pooled"
    cached = backbone.frozen_features(cache_side, inputs)["pooled"]
    assert torch.allclose(cached, backbone.frozen_features(worker_side, inputs)["pooled"])
    assert not torch.allclose(torch.rand(1), torch.rand(1))  # the global RNG still moves
