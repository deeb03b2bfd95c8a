"""Predictor texts/s with the torch, onnx and onnx-int8 runtimes on the bundled MiniLM.

The model is MiniLM (mean pooling) with a 2-class head trained here, in-process, with plain
torch on the frozen encoder's pooled features of `--train` MR sentences (full-batch AdamW on
cached features: seconds, no Ray). The same checkpoint folder is then loaded three ways
(`Predictor(folder, runtime=...)`, the ONNX ones exported on first load; that time is
`load_s`) and measured on ONE thread (torch and onnxruntime alike): texts/s of `predict` at
batch sizes 1, 8 and 32 over MR sentences, in `--rounds` interleaved rounds of `--seconds`
per runtime and size, keeping each one's best round (a shared machine's other jobs slow some
rounds; interleaving spreads that over all runtimes); the max |logit difference| to torch
and the accuracy of each runtime on `--eval` held-out MR sentences.

Sentences come from ../shared/data/mr (Pang & Lee, Latin-1); the benchmark needs them.

Usage (from the repository root):
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/onnx_runtime.py
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/onnx_runtime.py --seconds 5 --eval 500

Progress goes to stderr; stdout gets exactly one JSON line:
    {"benchmark": "onnx_runtime", "texts_per_s": {"torch": {"1": ..., "8": ..., "32": ...},
     "onnx": {...}, "onnx-int8": {...}}, "speedup": {...}, "max_abs_logit_diff": {...},
     "accuracy": {...}, "int8_accuracy_change": ..., "int8_agreement": ..., ...}
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

MR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mr"
RUNTIMES = ("torch", "onnx", "onnx-int8")
SIZES = (1, 8, 32)
MAX_LENGTH = 64


def log(message: str) -> None:
    print(f"[onnx_runtime] {message}", file=sys.stderr, flush=True)


def mr_split(train: int, held_out: int, seed: int = 0) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Disjoint, shuffled (text, label) lists from MR (1 = pos); the files are Latin-1."""
    if not (MR / "rt-polarity.pos").is_file():
        raise SystemExit(f"MR sentences not found under {MR}")
    rows = [(line.strip(), label)
            for name, label in (("rt-polarity.neg", 0), ("rt-polarity.pos", 1))
            for line in (MR / name).read_text(encoding="latin-1").splitlines() if line.strip()]  # fmt: skip
    random.Random(seed).shuffle(rows)
    return rows[:train], rows[train : train + held_out]


def train_head_checkpoint(folder: Path, rows: list[tuple[str, int]]) -> float:
    """MiniLM (frozen) + a linear head fitted on its pooled features; returns seconds taken."""
    import torch

    from tl_ray.backbones.registry import get_backbone
    from tl_ray.config import HFTextConfig
    from tl_ray.data import LabelMap
    from tl_ray.train.checkpoint import write_model_folder

    started = time.perf_counter()
    torch.manual_seed(0)
    backbone = get_backbone(HFTextConfig(name_or_path="minilm", unfreeze_depth=0))
    model = backbone.build(2)
    backbone.apply_unfreeze(model)
    model.eval()
    texts, labels = [t for t, _ in rows], torch.tensor([y for _, y in rows])
    features = torch.cat([model.frozen_features(**backbone.preprocess(texts[i : i + 64], MAX_LENGTH))["pooled"]
                          for i in range(0, len(texts), 64)])  # fmt: skip
    head = model.classifier
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(100):  # full batch on cached features; more steps overfit 1,000 sentences
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head(features), labels).backward()
        optimizer.step()
    with torch.no_grad():
        train_accuracy = float((head(features).argmax(-1) == labels).float().mean())
    folder.mkdir(parents=True)
    write_model_folder(folder, backbone, model, LabelMap(("neg", "pos")), epoch=1,
                       metrics={"train_accuracy": train_accuracy}, extra={"max_length": MAX_LENGTH})  # fmt: skip
    log(f"head trained on {len(rows)} sentences: train accuracy {train_accuracy:.3f}")
    return time.perf_counter() - started


def rate(predictor: Any, texts: list[str], size: int, seconds: float) -> float:
    """Texts/s of `predictor.predict` on consecutive batches of `size` for `seconds`."""
    predictor.predict(texts[:size])  # warm up this shape
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        predictor.predict([texts[(done + i) % len(texts)] for i in range(size)])
        done += size
    return round(done / (time.perf_counter() - started), 1)


def measure(folder: Path, held_out: list[tuple[str, int]], seconds: float, rounds: int) -> dict[str, Any]:
    from tl_ray.serve.predictor import Predictor

    texts, truth = [t for t, _ in held_out], np.array([y for _, y in held_out])
    results: dict[str, Any] = {}
    predictors = {}
    for runtime in RUNTIMES:
        started = time.perf_counter()
        predictors[runtime] = predictor = Predictor(folder, device="cpu", runtime=runtime, batch_size=32)
        load_s = time.perf_counter() - started
        logits = predictor.scores(texts)
        results[runtime] = {"load_s": round(load_s, 2), "logits": logits, "texts_per_s": {},
                            "accuracy": float((logits.argmax(-1) == truth).mean()),
                            "onnx_mb": _size_mb(getattr(predictor, "onnx_folder", None))}  # fmt: skip
        log(f"{runtime}: load {load_s:.2f} s, accuracy {results[runtime]['accuracy']:.3f}")
    for round_ in range(rounds):
        for size in SIZES:
            for runtime, predictor in predictors.items():
                speed = results[runtime]["texts_per_s"]
                speed[str(size)] = max(speed.get(str(size), 0.0), rate(predictor, texts, size, seconds))
        log(f"round {round_ + 1}: " + ", ".join(f"{r} {results[r]['texts_per_s']}" for r in RUNTIMES))
    return results


def _size_mb(folder: Path | None) -> float | None:
    return round((folder / "model.onnx").stat().st_size / 2**20, 1) if folder else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=1000, help="MR sentences the head trains on")
    parser.add_argument("--eval", type=int, default=1000, help="held-out MR sentences scored")
    parser.add_argument("--seconds", type=float, default=4.0, help="per runtime, batch size and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (best one kept)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(1)  # the ONNX sessions take torch's thread count
    train, held_out = mr_split(args.train, args.eval)
    root = Path(tempfile.mkdtemp(prefix="onnx-bench-"))
    try:
        head_s = train_head_checkpoint(root / "model", train)
        results = measure(root / "model", held_out, args.seconds, args.rounds)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = results["torch"]
    predictions = {r: results[r]["logits"].argmax(-1) for r in RUNTIMES}
    print(json.dumps({
        "benchmark": "onnx_runtime", "model": "minilm (mean pooling, head trained on MR)",
        "threads": 1, "max_length": MAX_LENGTH, "seconds": args.seconds, "rounds": args.rounds,
        "train_texts": len(train), "eval_texts": len(held_out),
        "texts_per_s": {r: results[r]["texts_per_s"] for r in RUNTIMES},
        "speedup": {r: {s: round(results[r]["texts_per_s"][s] / v, 2) for s, v in base["texts_per_s"].items()}
                    for r in RUNTIMES[1:]},
        "max_abs_logit_diff": {r: float(np.abs(results[r]["logits"] - base["logits"]).max()) for r in RUNTIMES[1:]},
        "accuracy": {r: round(results[r]["accuracy"], 4) for r in RUNTIMES},
        "int8_accuracy_change": round(results["onnx-int8"]["accuracy"] - base["accuracy"], 4),
        "int8_agreement": float((predictions["onnx-int8"] == predictions["torch"]).mean()),
        "load_s": {r: results[r]["load_s"] for r in RUNTIMES},
        "onnx_mb": {r: results[r]["onnx_mb"] for r in RUNTIMES[1:]},
        "head_train_s": round(head_s, 1), "load_average": [round(x, 1) for x in os.getloadavg()],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
