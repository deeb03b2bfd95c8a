"""Text classifiers on pretrained word vectors (word2vec, GloVe, fastText, loaded by gensim).

The embedding is initialised from the vectors (row 0 pads, row 1 is the unknown word) and
feeds an encoder (`mean` pooling, Kim 2014's `cnn`, or a `bilstm`) and a linear head.
Unfreeze depth 0 keeps the embedding frozen, 1 trains it; encoder and head always train, as
does the learned unknown-word vector. The checkpoint holds the vocabulary, the embedding
and (for `oov: subword`) fastText's n-gram matrix, so serving needs no vectors file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from tl_ray.backbones.base import Backbone
from tl_ray.backbones.registry import register
from tl_ray.backbones.word_vectors_io import UNK, Vectors, Vocab, load_vectors
from tl_ray.errors import BackboneError, CheckpointError
from tl_ray.extras import require
from tl_ray.io import write_json_atomic

__all__ = ["WordVectorsBackbone", "WordVectorsClassifier"]

VOCAB_FILE = "word_vectors.json"
WEIGHTS_FILE = "model.safetensors"
NGRAMS_FILE = "ngrams.safetensors"  # fastText n-gram vectors, for oov: subword


@register("word-vectors")
class WordVectorsBackbone(Backbone):
    """`backbone: {kind: word-vectors, vectors: PATH, unfreeze_depth: 0|1, encoder, oov, init}`."""

    @property
    def path(self) -> str:
        """The vectors file (recorded as the manifest's `base_path`)."""
        return self.cfg.vectors

    def num_layers(self) -> int:
        return 1  # the embedding is the one pretrained layer

    def base_depth(self) -> int:
        """`unfreeze_depth`; None is 1, or 0 before an unfreeze schedule's first step."""
        if self.cfg.unfreeze_depth is not None:
            return self.cfg.unfreeze_depth
        return 0 if self.cfg.unfreeze_schedule is not None else 1

    @property
    def depth(self) -> int:
        """The depth at epoch 1 (the configured one), checked against the one layer."""
        if self.base_depth() > 1:
            raise BackboneError(
                "backbone.unfreeze_depth must be between 0 and 1 for word-vectors "
                f"(0 = frozen embeddings, 1 = trainable; 1 layer), got {self.base_depth()}"
            )
        self.check_schedule(" for word-vectors")
        return self.depth_at(1)

    def check(self) -> None:
        require("word-vectors", "backbone kind word-vectors")  # gensim reads the vectors file
        self.depth  # noqa: B018
        if self.cfg.oov == "subword" and self.cfg.init == "random":
            raise BackboneError(
                "backbone.oov: subword needs init: pretrained (random word vectors and "
                "pretrained n-gram vectors do not mix); use oov: learned"
            )
        if not Path(self.cfg.vectors).expanduser().is_file():
            raise BackboneError(f"backbone.vectors: file not found: {self.cfg.vectors}")

    # -- vectors and vocabulary -----------------------------------------------------------
    @property
    def vectors(self) -> Vectors:
        if getattr(self, "_vectors", None) is None:
            self._vectors = load_vectors(self.cfg.vectors, self.cfg.max_vocab)
        return self._vectors

    @property
    def vocab(self) -> Vocab:
        """The vocabulary of the vectors file, or of the checkpoint once `load` ran."""
        if getattr(self, "_vocab", None) is None:
            vectors = self.vectors
            oov = self.cfg.oov
            if oov == "auto":
                oov = "subword" if vectors.subwords and self.cfg.init == "pretrained" else "learned"
            if oov == "subword" and vectors.subwords is None:
                raise BackboneError(
                    f"backbone.oov: subword needs fastText vectors with n-grams (a Facebook "
                    f"fastText .bin or a gensim FastText .model); {self.cfg.vectors} "
                    f"({vectors.source_format}) has none; use oov: learned or zero"
                )
            sub = vectors.subwords if oov == "subword" else None
            self._vocab = Vocab(
                vectors.words, oov, Vocab.is_lowercase(vectors.words),
                sub.min_n if sub else 0, sub.max_n if sub else 0, sub.matrix if sub else None,
            )
        return self._vocab

    # -- model ----------------------------------------------------------------------------
    def _module(self, vocab: Vocab, dim: int, num_labels: int) -> WordVectorsClassifier:
        cfg = self.cfg
        return WordVectorsClassifier(
            vocab.size, dim, num_labels, encoder=cfg.encoder, oov=vocab.oov,
            filters=tuple(cfg.cnn_filters), maps=cfg.cnn_maps, hidden=cfg.lstm_hidden,
            dropout=cfg.dropout,
        )

    def build(self, num_labels: int) -> nn.Module:
        self.check()
        vectors, vocab = self.vectors, self.vocab
        matrix = torch.from_numpy(vectors.matrix)
        model = self._module(vocab, matrix.shape[1], num_labels)
        with torch.no_grad():
            weight = model.embedding.weight
            weight.zero_()
            if self.cfg.init == "pretrained":
                weight[2:] = matrix
            else:  # Kim's CNN-rand: uniform, with the variance of the pretrained vectors
                bound = math.sqrt(3.0) * float(matrix.std())
                weight[2:].uniform_(-bound, bound)
        return model

    def layer_of(self, name: str) -> int:
        return 1 if name.startswith("embedding.") else 0

    def apply_unfreeze(self, model: nn.Module, depth: int | None = None) -> None:
        depth = self.depth if depth is None else depth
        for name, param in model.named_parameters():
            param.requires_grad = depth >= 1 or self.layer_of(name) == 0

    # -- the frozen embedding, computed once and cached (tl_ray.train.feature_cache) ------
    def prefix_cache(self, depth: int | None = None) -> str | None:
        """`embedded` with a frozen embedding (at `depth`, None: at epoch 1) and a fixed
        unknown-word vector, else None."""
        depth = self.depth if depth is None else depth
        if depth != 0 or self.vocab.oov == "learned":  # a learned unk vector trains
            return None
        return "embedded"

    def fingerprint(self) -> dict[str, str]:
        """The vectors file's identity (path, size, mtime) and the vocabulary settings."""
        stat = Path(self.cfg.vectors).expanduser().stat()
        settings = {"max_vocab": self.cfg.max_vocab, "oov": self.vocab.oov, "init": self.cfg.init}
        return {"vectors": f"{self.cfg.vectors}:{stat.st_size}:{stat.st_mtime_ns}",
                "settings": json.dumps(settings, sort_keys=True)}  # fmt: skip

    def frozen_features(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            embedded = model.embed(inputs["input_ids"], inputs.get("oov_vectors"))
        return {"embedded": embedded, "attention_mask": (inputs["input_ids"] != 0).long()}

    # -- data and persistence -------------------------------------------------------------
    def preprocess(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v) for k, v in self.vocab.encode(list(texts), max_length).items()}

    def save(self, model: nn.Module, folder: Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE))
        if self.vocab.ngrams is not None:
            save_file({"ngrams": torch.from_numpy(self.vocab.ngrams)}, str(folder / NGRAMS_FILE))
        write_json_atomic(
            folder / VOCAB_FILE,
            {**self.vocab.to_dict(), "dim": int(model.embedding.embedding_dim),
             "num_labels": model.num_labels},
        )

    def load(self, folder: Path, num_labels: int, trainable: bool = False) -> nn.Module:
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            meta = json.loads((folder / VOCAB_FILE).read_text(encoding="utf-8"))
            state = load_file(str(folder / WEIGHTS_FILE))
            ngrams = (load_file(str(folder / NGRAMS_FILE))["ngrams"].numpy()
                      if meta["oov"] == "subword" else None)
            vocab = Vocab(meta["words"], meta["oov"], meta["lowercase"],
                          meta["min_n"], meta["max_n"], ngrams)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{folder}: cannot read the word-vectors model ({error})") from None
        model = self._module(vocab, int(meta["dim"]), num_labels)
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise CheckpointError(
                f"{folder}: weights do not fit backbone config ({str(error).splitlines()[0]})"
            ) from None
        self._vocab = vocab  # preprocess now uses the checkpoint's vocabulary
        return model


class WordVectorsClassifier(nn.Module):
    """Embedding (+ unknown-word policy) -> encoder -> dropout -> linear head."""

    def __init__(
        self, vocab_size: int, dim: int, num_labels: int, *, encoder: str, oov: str,
        filters: tuple[int, ...], maps: int, hidden: int, dropout: float,
    ) -> None:
        super().__init__()
        self.num_labels, self.encoder_kind, self.oov = num_labels, encoder, oov
        self.vocab_size, self.filters = vocab_size, filters
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=0)
        if oov == "learned":
            self.unk = nn.Parameter(torch.empty(dim).uniform_(-0.05, 0.05))
        if encoder == "mean":
            features = dim
        elif encoder == "cnn":
            self.convs = nn.ModuleList(nn.Conv1d(dim, maps, width) for width in filters)
            features = maps * len(filters)
        elif encoder == "bilstm":
            self.lstm = nn.LSTM(dim, hidden, batch_first=True, bidirectional=True)
            features = 2 * hidden
        else:
            raise BackboneError(f"backbone.encoder must be mean, cnn or bilstm, got {encoder!r}")
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(features, num_labels)

    def embed(self, input_ids: torch.Tensor, oov_vectors: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, length, dim) vectors, unknown words resolved by the OOV policy.

        Ids >= vocab_size index `oov_vectors`, the batch's unknown words (oov: subword).
        """
        batch_oov = input_ids >= self.vocab_size
        x = self.embedding(torch.where(batch_oov, torch.full_like(input_ids, UNK), input_ids))
        unknown = (input_ids == UNK).unsqueeze(-1)
        if self.oov == "learned":
            x = torch.where(unknown, self.unk.expand_as(x), x)
        elif self.oov == "zero":  # also keeps row UNK from training when the embedding does
            x = x.masked_fill(unknown, 0.0)
        elif oov_vectors is not None:
            local = (input_ids - self.vocab_size).clamp(min=0)
            x = torch.where(batch_oov.unsqueeze(-1), oov_vectors.to(x.dtype)[local], x)
        return x

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        oov_vectors: torch.Tensor | None = None,
        embedded: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores from token ids, or from cached `embedded` vectors with their `attention_mask`."""
        if embedded is None:
            x, present = self.embed(input_ids, oov_vectors), input_ids != 0
        else:
            x, present = embedded, attention_mask.bool()
        lengths = present.sum(1)
        if self.encoder_kind == "mean":
            mask = present.unsqueeze(-1).to(x.dtype)
            pooled = (x * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        elif self.encoder_kind == "cnn":
            pooled = self._cnn(x, lengths)
        else:
            packed = nn.utils.rnn.pack_padded_sequence(
                x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
            )
            _, (hidden, _) = self.lstm(packed)
            pooled = torch.cat([hidden[-2], hidden[-1]], dim=-1)
        return self.classifier(self.dropout(pooled))

    def _cnn(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Kim (2014): ReLU feature maps per filter width, max over time.

        Each text counts as at least `max(filters)` tokens (zero-padded) and windows past that
        are masked, so a text's scores never depend on the other texts in its batch.
        """
        widest = max(self.filters)
        if x.shape[1] < widest:
            x = F.pad(x, (0, 0, 0, widest - x.shape[1]))
        x = x.transpose(1, 2)  # (batch, dim, time)
        span = lengths.clamp(min=widest)
        pooled = []
        for width, conv in zip(self.filters, self.convs):
            maps = F.relu(conv(x))  # (batch, maps, time - width + 1)
            valid = torch.arange(maps.shape[-1], device=x.device) < (span - width + 1).unsqueeze(1)
            pooled.append(maps.masked_fill(~valid.unsqueeze(1), float("-inf")).amax(-1))
        return torch.cat(pooled, dim=-1)
