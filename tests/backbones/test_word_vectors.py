"""The word-vectors backbone: every vector format, OOV policies, unfreezing, encoders, round trip."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tl_ray.backbones.registry import get_backbone
from tl_ray.backbones.word_vectors_io import ft_hash, load_vectors, ngram_buckets
from tl_ray.config import WordVectorsConfig
from tl_ray.data import LabelMap
from tl_ray.errors import BackboneError
from tl_ray.serve.predictor import Predictor
from tl_ray.train.checkpoint import write_model_folder

GENSIM_DATA = Path(__import__("gensim").__file__).parent / "test" / "test_data"
SENTENCES = [["good", "film", "Great", "plot"], ["bad", "film", "dull", "plot"]] * 10


def _fasttext():
    from gensim.models import FastText

    model = FastText(vector_size=8, min_count=1, bucket=500, min_n=2, max_n=4, epochs=2, workers=1, seed=0)
    model.build_vocab(SENTENCES)
    model.train(SENTENCES, total_examples=len(SENTENCES), epochs=2)
    return model


def _word2vec():
    from gensim.models import Word2Vec

    return Word2Vec(SENTENCES, vector_size=8, min_count=1, epochs=2, workers=1, seed=0)


def _write(fmt: str, folder: Path):
    """Tiny vectors saved in one format; returns (path, the KeyedVectors written)."""
    from gensim.models.fasttext import save_facebook_model

    model = _fasttext() if fmt in ("fasttext.model", "facebook.bin") else _word2vec()
    path = folder / {"w2v.vec": "v.vec", "w2v.bin": "v.bin", "glove.txt": "v.txt", "kv": "v.kv",
                     "word2vec.model": "w.model", "fasttext.model": "f.model",
                     "facebook.bin": "f.bin", "w2v.txt.gz": "v.txt.gz"}[fmt]
    if fmt in ("w2v.vec", "w2v.txt.gz"):
        model.wv.save_word2vec_format(str(path))
    elif fmt == "w2v.bin":
        model.wv.save_word2vec_format(str(path), binary=True)
    elif fmt == "glove.txt":
        model.wv.save_word2vec_format(str(path), write_header=False)
    elif fmt == "kv":
        model.wv.save(str(path))
    elif fmt == "facebook.bin":
        save_facebook_model(model, str(path))
    else:
        model.save(str(path))
    return path, model.wv


FORMATS = {
    "w2v.vec": "word2vec text", "w2v.bin": "word2vec binary", "glove.txt": "GloVe text (no header)",
    "kv": "gensim saved model/KeyedVectors", "word2vec.model": "gensim saved model/KeyedVectors",
    "fasttext.model": "gensim saved model/KeyedVectors", "facebook.bin": "Facebook fastText .bin",
    "w2v.txt.gz": "word2vec text",
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_loads_the_same_words_and_vectors(fmt, tmp_path):
    path, kv = _write(fmt, tmp_path)
    vectors = load_vectors(path)
    assert vectors.source_format == FORMATS[fmt]
    assert vectors.words == list(kv.index_to_key)
    assert np.allclose(vectors.matrix, kv.vectors[: len(vectors.words)], atol=1e-6)
    assert (vectors.subwords is not None) == (fmt in ("fasttext.model", "facebook.bin"))
    assert load_vectors(path, max_vocab=3).words == list(kv.index_to_key[:3])


def test_gensim_shipped_vectors_load():
    vec = load_vectors(GENSIM_DATA / "pang_lee_polarity_fasttext.vec")
    assert vec.matrix.shape == (1694, 100) and vec.source_format == "word2vec text"
    toy = load_vectors(GENSIM_DATA / "toy-model.bin")  # an unsupervised Facebook fastText model
    assert toy.source_format == "Facebook fastText .bin" and toy.subwords is not None
    assert load_vectors(GENSIM_DATA / "toy-model.vec").words == toy.words
    glove = load_vectors(GENSIM_DATA / "test_glove.txt", max_vocab=50)
    assert glove.source_format == "GloVe text (no header)" and glove.words[0] == "the"


def test_unreadable_files_fail_with_one_line_naming_the_formats(tmp_path):
    # gensim cannot read supervised fastText models such as the one it ships
    with pytest.raises(BackboneError, match="Facebook fastText .bin.*[Ss]upervised"):
        load_vectors(GENSIM_DATA / "pang_lee_polarity_fasttext.bin")
    table = tmp_path / "data.csv"
    table.write_text("text,label\ngood film,pos\n", encoding="utf-8")
    with pytest.raises(BackboneError) as error:
        load_vectors(table)
    message = str(error.value)
    assert "\n" not in message
    assert all(f in message for f in ("word2vec text", "GloVe", "word2vec binary", "gensim saved"))
    (tmp_path / "empty.vec").write_bytes(b"")
    with pytest.raises(BackboneError, match="empty"):
        load_vectors(tmp_path / "empty.vec")
    with pytest.raises(BackboneError, match="not found"):
        get_backbone(WordVectorsConfig(vectors=str(tmp_path / "missing.vec"))).check()


def test_subword_oov_vectors_match_gensim(tmp_path):
    from gensim.models.fasttext import ft_hash_bytes, ft_ngram_hashes

    path, kv = _write("facebook.bin", tmp_path)
    for word in ("unseen", "héllo", "日本語", "x"):
        assert ngram_buckets(word, kv.min_n, kv.max_n, kv.bucket) == ft_ngram_hashes(
            word, kv.min_n, kv.max_n, kv.bucket)
        assert ft_hash(word.encode()) == ft_hash_bytes(word.encode())
    backbone = get_backbone(WordVectorsConfig(vectors=str(path), encoder="mean"))
    model = backbone.build(num_labels=2)
    assert backbone.vocab.oov == "subword"
    words = ["films", "goood", "héllo", "film"]
    with torch.no_grad():
        embedded = model.embed(**backbone.preprocess([" ".join(words)], 16))[0]
    for row, word in zip(embedded, words):
        assert np.allclose(row.numpy(), kv[word], atol=1e-6), word


def test_learned_and_zero_oov_and_no_subwords_without_ngrams(tmp_path):
    path, _ = _write("w2v.vec", tmp_path)
    with pytest.raises(BackboneError, match="subword needs fastText vectors"):
        get_backbone(WordVectorsConfig(vectors=str(path), oov="subword")).build(2)
    for oov in ("learned", "zero"):
        backbone = get_backbone(WordVectorsConfig(vectors=str(path), oov=oov, encoder="mean"))
        model = backbone.build(num_labels=2)
        inputs = backbone.preprocess(["good zzz"], 8)
        assert inputs["input_ids"].tolist() == [[backbone.vocab.lookup("good"), 1]]
        unknown = model.embed(**inputs)[0, 1]
        expected = model.unk if oov == "learned" else torch.zeros(8)
        assert torch.equal(unknown, expected)
        assert ("unk" in dict(model.named_parameters())) == (oov == "learned")
        model(**inputs).sum().backward()  # the unknown word's row of the embedding never trains
        assert torch.equal(model.embedding.weight.grad[1], torch.zeros(8))


def test_case_follows_the_vocabulary(tmp_path):
    path, _ = _write("w2v.vec", tmp_path)  # mixed case: "Great" is capitalised
    backbone = get_backbone(WordVectorsConfig(vectors=str(path)))
    vocab = backbone.vocab
    assert not vocab.lowercase
    assert vocab.lookup("Great") == vocab.index["Great"] and vocab.lookup("FILM") == vocab.index["film"]
    assert vocab.lookup("great") is None
    lower = get_backbone(WordVectorsConfig(vectors=str(GENSIM_DATA / "pang_lee_polarity_fasttext.vec")))
    assert lower.vocab.lowercase and lower.vocab.lookup("Film") == lower.vocab.index["film"]


@pytest.mark.parametrize("depth", [0, 1])
def test_one_step_changes_exactly_the_trainable_tensors(depth, tiny_vectors):
    backbone = get_backbone(WordVectorsConfig(vectors=tiny_vectors, unfreeze_depth=depth, oov="learned"))
    torch.manual_seed(0)
    model = backbone.build(num_labels=2)
    backbone.apply_unfreeze(model)
    assert model.embedding.weight.requires_grad == (depth == 1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(backbone.param_groups(model, 1e-2, 0.0))
    inputs = backbone.preprocess(["good great film", "bad dull zzz plot"], 16)
    loss = torch.nn.functional.cross_entropy(backbone.logits(model, inputs), torch.tensor([1, 0]))
    loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    expected = {n for n, _ in model.named_parameters()} - ({"embedding.weight"} if depth == 0 else set())
    assert changed == expected
    assert torch.equal(model.embedding.weight[0], torch.zeros(16))  # padding row stays zero


@pytest.mark.parametrize("encoder", ["mean", "cnn", "bilstm"])
def test_encoders_give_batch_independent_scores(encoder, tiny_vectors):
    backbone = get_backbone(WordVectorsConfig(vectors=tiny_vectors, encoder=encoder, lstm_hidden=12))
    torch.manual_seed(0)
    model = backbone.build(num_labels=3).eval()
    features = {"mean": 16, "cnn": 300, "bilstm": 24}[encoder]
    assert model.classifier.in_features == features
    texts = ["good", "a long dull boring tedious plot with weak actors and the story", ""]
    with torch.no_grad():
        together = model(**backbone.preprocess(texts, 32))
        alone = torch.cat([model(**backbone.preprocess([t], 32)) for t in texts])
    assert together.shape == (3, 3)
    assert torch.allclose(together, alone, atol=1e-5)


def test_random_init_keeps_the_vocabulary_but_not_the_vectors(tiny_vectors):
    pretrained = get_backbone(WordVectorsConfig(vectors=tiny_vectors)).build(2)
    random = get_backbone(WordVectorsConfig(vectors=tiny_vectors, init="random")).build(2)
    assert random.embedding.weight.shape == pretrained.embedding.weight.shape
    assert not torch.allclose(random.embedding.weight[2:], pretrained.embedding.weight[2:])
    with pytest.raises(BackboneError, match="init: pretrained"):
        get_backbone(WordVectorsConfig(vectors=tiny_vectors, init="random", oov="subword")).check()


def test_checkpoint_serves_without_the_vectors_file(tiny_vectors, tmp_path):
    vectors = tmp_path / "vectors.model"
    shutil.copy(tiny_vectors, vectors)
    backbone = get_backbone(WordVectorsConfig(vectors=str(vectors), encoder="bilstm"))
    torch.manual_seed(0)
    model = backbone.build(num_labels=2).eval()
    folder = tmp_path / "model"
    folder.mkdir()
    write_model_folder(folder, backbone, model, LabelMap(("neg", "pos")), metrics={}, epoch=1,
                       extra={"max_length": 32})
    vectors.unlink()
    texts = ["good great film", "bad unseenword plot", ""]
    with torch.no_grad():
        expected = backbone.logits(model, backbone.preprocess(texts, 32))
    predictor = Predictor(folder)
    assert torch.equal(predictor.logits(texts), expected)
    assert predictor.backbone.vocab.oov == "subword"


def test_shipped_search_space_validates_for_word_vectors(tiny_vectors):
    from tl_ray.config import parse_config
    from tl_ray.errors import ConfigError
    from tl_ray.search.space import load_space, validate_against

    spaces = Path(__file__).resolve().parents[2] / "search_spaces"
    cfg = parse_config({"data": {"path": "x.csv"},
                        "backbone": {"kind": "word-vectors", "vectors": tiny_vectors}})
    layers = get_backbone(cfg.backbone).num_layers()
    validate_against(load_space(spaces / "word-vectors.yaml"), cfg, max_depth=layers)
    with pytest.raises(ConfigError, match="exceeds the backbone's 1 layers"):  # MiniLM's depths
        validate_against(load_space(spaces / "minilm-sentiment.yaml").without(["backbone.lora_rank"]),
                         cfg, max_depth=layers)


def test_train_and_predict_through_the_cli_from_a_vec_file(ray_session, tiny_vectors, sentiment_csv,
                                                           tmp_path):
    """A real Ray Train run (2 DDP workers) from a word2vec text file, then `tl-ray predict`."""
    from gensim.models import FastText
    from helpers import run_cli

    vec = tmp_path / "tiny.vec"
    FastText.load(tiny_vectors).wv.save_word2vec_format(str(vec))
    config = tmp_path / "run.yaml"
    config.write_text(
        f"data: {{path: {sentiment_csv}, validation_split: 0.25}}\n"
        f"backbone: {{kind: word-vectors, vectors: {vec}, encoder: cnn, unfreeze_depth: 1}}\n"
        "train: {lr: 5.0e-3, epochs: 3, batch_size: 16, max_length: 32, num_workers: 2,"
        " warmup_ratio: 0.0}\n"
        f"output: {tmp_path / 'run'}\n",
        encoding="utf-8",
    )

    code, lines = run_cli(["train", config])
    assert code == 0
    summary = lines[-1]
    assert summary["metrics"]["val_count"] == 60 and summary["metrics"]["val_accuracy"] >= 0.9, summary
    model_dir = Path(summary["model"])
    assert {"word_vectors.json", "model.safetensors", "labels.json"} <= {p.name for p in model_dir.iterdir()}
    vec.unlink()  # serving needs the checkpoint only
    texts = ["good great film", "bad awful film"]
    code, lines = run_cli(["predict", model_dir, "--text", texts[0], "--text", texts[1]])
    assert code == 0
    assert [line["label"] for line in lines] == [p["label"] for p in Predictor(model_dir).predict(texts)]
    assert [line["label"] for line in lines] == ["pos", "neg"]
