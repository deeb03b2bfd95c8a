"""TPE + ASHA against random search without early stopping: same space, data and seeds.

Prints one JSON line with each strategy's best validation accuracy and the trial-epochs it
spent. Goal: the same best accuracy (within 0.5 pt) for at most half the trial-epochs.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/search_efficiency.py --trials 8 --epochs 3

Data: 600 balanced sentences from ../shared/data/mr when present, else the 200 that ship
inside gensim. Backbone: the bundled MiniLM.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import gensim
import pyarrow.parquet as pq

from tl_ray.config import parse_config
from tl_ray.search.space import load_space
from tl_ray.search.tune import run_search
from tl_ray.train.driver import ensure_ray

ROOT = Path(__file__).resolve().parents[1]
MR = ROOT.parent / "shared" / "data" / "mr"


def write_data(folder: Path, per_class: int, seed: int) -> tuple[Path, str]:
    if not MR.is_dir():
        source = Path(gensim.__file__).parent / "test" / "test_data" / "pang_lee_polarity.cor"
        return source, "cp1252"
    rng = random.Random(seed)
    rows = []
    for label in ("pos", "neg"):
        lines = (MR / f"rt-polarity.{label}").read_text(encoding="latin-1").splitlines()
        rows += [(text, label) for text in rng.sample(lines, per_class)]
    path = folder / "mr.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([("text", "label"), *rows])
    return path, "utf-8"


def search(data: Path, encoding: str, folder: Path, args, *, sampler: str, early_stopping: bool) -> dict:
    cfg = parse_config(
        {
            "data": {"path": str(data), "encoding": encoding, "validation_split": 0.2},
            "backbone": {"kind": "hf-text", "name_or_path": "minilm"},
            "train": {"epochs": args.epochs, "batch_size": 32, "max_length": 48, "seed": args.seed},
            "search": {"trials": args.trials, "sampler": sampler, "seed": args.seed,
                       "early_stopping": early_stopping, "max_concurrent_trials": args.concurrency},
            "output": str(folder),
        }
    )
    started = time.perf_counter()
    best = run_search(cfg, load_space(ROOT / "search_spaces" / "minilm-sentiment.yaml"),
                      echo=lambda line: print(line, file=sys.stderr))
    rows = pq.read_table(folder / "trials.parquet").to_pylist()
    return {"best_accuracy": best["metrics"]["val_accuracy"], "trial_epochs": len(rows),
            "wall_s": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    ensure_ray()
    with tempfile.TemporaryDirectory(prefix="tl-ray-bench-") as tmp:
        tmp = Path(tmp)
        data, encoding = write_data(tmp, args.per_class, args.seed)
        tpe = search(data, encoding, tmp / "tpe", args, sampler="tpe", early_stopping=True)
        rnd = search(data, encoding, tmp / "random", args, sampler="random", early_stopping=False)
    print(json.dumps({
        "benchmark": "search_efficiency",
        "trials": args.trials, "max_epochs": args.epochs, "data": data.name,
        "tpe_asha": tpe, "random_full": rnd,
        "accuracy_gap_pt": round(100 * (rnd["best_accuracy"] - tpe["best_accuracy"]), 2),
        "trial_epoch_ratio": round(tpe["trial_epochs"] / rnd["trial_epochs"], 3),
        "goal": "gap <= 0.5 pt and ratio <= 0.5",
    }))


if __name__ == "__main__":
    main()
