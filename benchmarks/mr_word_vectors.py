"""MR sentence polarity with Kim (2014)'s CNN: random vs frozen vs fine-tuned word vectors.

Data: the sentence polarity dataset v1.0 of Pang & Lee (`rt-polarity.pos` / `.neg`, 5,331
sentences each, Latin-1), in the folder given as the first argument. A fixed seeded 10%
of the sentences is held out for testing; the rest trains.

Vectors: `tl_ray.w2v.train_model` (what `tl-ray w2v train` runs, here called in-process
rather than as a Ray task) trains Word2Vec on the TRAINING split's sentences only. The three
figures share that vocabulary (words not in it use one learned unknown-word vector):
  * cnn-rand:        `init: random`, embeddings trained   (Kim: CNN-rand,       76.1)
  * cnn-static:      pretrained, `unfreeze_depth: 0`       (Kim: CNN-static,     81.0)
  * cnn-non-static:  pretrained, `unfreeze_depth: 1`       (Kim: CNN-non-static, 81.5)
Kim's figures are 10-fold cross-validation with word2vec trained on 100 B words of Google
News; ours are one split with vectors from ~0.2 M words of in-domain text.

Training goes through the plain PyTorch path of the word-vectors backbone (build,
apply_unfreeze, param_groups, preprocess, logits; AdamW, no Ray): one process, fixed epochs,
no early stopping, and accuracy measured once after the last epoch (the test split never
chooses anything). CNN: filter widths 3, 4, 5 with 100 maps each, max-over-time pooling,
dropout 0.5, batch 50 (Kim's settings; Kim used Adadelta and a max-norm constraint, we use
AdamW).

Usage (from the repository root; about 5-10 minutes on 2 cores):
    .venv/bin/python benchmarks/mr_word_vectors.py /path/to/mr
    .venv/bin/python benchmarks/mr_word_vectors.py /path/to/mr --epochs 2 --w2v-epochs 5

stdout: one JSON line per figure:
    {"benchmark": "mr_word_vectors", "figure": "cnn-static", "accuracy": ..., "kim2014": 81.0, ...}
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

FIGURES = {  # name -> (backbone settings, Kim 2014's MR accuracy)
    "cnn-rand": ({"init": "random", "unfreeze_depth": 1}, 76.1),
    "cnn-static": ({"init": "pretrained", "unfreeze_depth": 0}, 81.0),
    "cnn-non-static": ({"init": "pretrained", "unfreeze_depth": 1}, 81.5),
}


def read_mr(folder: Path) -> list[tuple[str, int]]:
    rows = []
    for name, label in (("rt-polarity.neg", 0), ("rt-polarity.pos", 1)):
        path = folder / name
        if not path.is_file():
            sys.exit(f"error: {path} not found; pass the folder holding rt-polarity.pos/.neg")
        text = path.read_text(encoding="latin-1")  # the files are Latin-1, not UTF-8
        rows += [(line.strip(), label) for line in text.splitlines() if line.strip()]
    return rows


def split(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    cut = int(round(len(rows) * fraction))
    return [rows[i] for i in order[cut:]], [rows[i] for i in order[:cut]]


def length_bucketed_batches(rows: list, size: int, rng: random.Random) -> list[list]:
    """Shuffled batches of similar-length sentences (less padding: the CNN's cost is padded length)."""
    from tl_ray.backbones.word_vectors_io import tokenize

    order = list(range(len(rows)))
    rng.shuffle(order)
    batches = []
    for start in range(0, len(order), size * 20):
        chunk = sorted(order[start : start + size * 20], key=lambda i: len(tokenize(rows[i][0])))
        batches += [[rows[i] for i in chunk[j : j + size]] for j in range(0, len(chunk), size)]
    rng.shuffle(batches)
    return batches


def train_and_score(settings: dict, vectors: str, train: list, test: list, args) -> dict:
    import torch

    from tl_ray.backbones.registry import get_backbone
    from tl_ray.config import WordVectorsConfig

    torch.manual_seed(args.seed)
    backbone = get_backbone(WordVectorsConfig(vectors=vectors, encoder="cnn", oov="learned",
                                              dropout=0.5, **settings))
    model = backbone.build(num_labels=2)
    backbone.apply_unfreeze(model)
    optimizer = torch.optim.AdamW(backbone.param_groups(model, args.lr, 0.0))
    rng = random.Random(args.seed)
    started = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        total = 0.0
        for batch in length_bucketed_batches(train, args.batch_size, rng):
            inputs = backbone.preprocess([t for t, _ in batch], args.max_length)
            loss = torch.nn.functional.cross_entropy(
                backbone.logits(model, inputs), torch.tensor([y for _, y in batch]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        print(f"  epoch {epoch}: train_loss {total / len(train):.4f} "
              f"({time.perf_counter() - started:.0f}s)", file=sys.stderr, flush=True)
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(test), 500):
            batch = test[start : start + 500]
            logits = backbone.logits(model, backbone.preprocess([t for t, _ in batch], args.max_length))
            correct += int((logits.argmax(-1) == torch.tensor([y for _, y in batch])).sum())
    return {"accuracy": round(100.0 * correct / len(test), 2),
            "train_seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="folder with rt-polarity.pos and rt-polarity.neg")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--vector-size", type=int, default=300)
    parser.add_argument("--w2v-epochs", type=int, default=20)
    parser.add_argument("--figures", nargs="*", default=list(FIGURES), choices=list(FIGURES))
    args = parser.parse_args()

    import torch

    from tl_ray.w2v import train_model

    torch.set_num_threads(args.threads)
    train, test = split(read_mr(args.data), args.test_fraction, args.seed)
    with tempfile.TemporaryDirectory(prefix="mr-w2v-") as folder:
        corpus = Path(folder) / "train.txt"
        corpus.write_text("\n".join(t for t, _ in train) + "\n", encoding="utf-8")
        w2v = train_model(corpus, Path(folder) / "mr.model", vector_size=args.vector_size,
                          window=5, min_count=1, epochs=args.w2v_epochs, workers=2,
                          seed=args.seed, skip_gram=True)
        print(f"w2v: {json.dumps(w2v)}", file=sys.stderr, flush=True)
        for name in args.figures:
            settings, kim = FIGURES[name]
            print(f"{name}:", file=sys.stderr, flush=True)
            result = train_and_score(settings, w2v["model"], train, test, args)
            print(json.dumps({
                "benchmark": "mr_word_vectors", "figure": name, **result, "kim2014": kim,
                "train_sentences": len(train), "test_sentences": len(test), "seed": args.seed,
                "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                "w2v": {"words": w2v["words"], "corpus_words": w2v["corpus_words"],
                        "vector_size": args.vector_size, "epochs": args.w2v_epochs,
                        "skip_gram": True, "seconds": w2v["seconds"]},
            }), flush=True)


if __name__ == "__main__":
    main()
