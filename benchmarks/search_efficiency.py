"""TPE + ASHA against random search without early stopping: same space, data, trial budget.

For each seed, two real searches of the bundled MiniLM with the shipped space
(search_spaces/minilm-sentiment.yaml): TPE with ASHA early stopping, and random search that
trains every trial to the last epoch. Per search: the trial-epochs it spent, its best
validation accuracy, and the trial-epochs it had spent when it first came within 0.5 point
of its own final best (in the order the epochs were reported). One JSON line with the
per-seed figures, their means, and `epochs_ratio` = TPE+ASHA trial-epochs / random's.
Goal: epochs_ratio <= 0.5 with the mean best accuracy within 0.5 point of random's.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/search_efficiency.py
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/search_efficiency.py --seeds 0 --trials 4

Data: `--per-class` sentences of each class from ../shared/data/mr (1,000 in all by
default; the same sample for every search), else the 200 that ship inside gensim.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import gensim

from tl_ray.config import parse_config
from tl_ray.search.results import LOG_FILE
from tl_ray.search.space import load_space
from tl_ray.search.tune import run_search
from tl_ray.train.driver import ensure_ray

ROOT = Path(__file__).resolve().parents[1]
MR = ROOT.parent / "shared" / "data" / "mr"
NEAR_PT = 0.5


def write_data(folder: Path, per_class: int, seed: int) -> tuple[Path, str]:
    """A balanced CSV sample of MR (UTF-8), or gensim's 200 sentences when MR is absent."""
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


def epochs_to_near_best(accuracies: list[float], best: float) -> int:
    """Trial-epochs spent when the search first reported within NEAR_PT of `best`.

    >>> epochs_to_near_best([0.5, 0.8, 0.79, 0.81], 0.81)
    2
    """
    return next(i for i, value in enumerate(accuracies, start=1) if value >= best - NEAR_PT / 100)


def search(data: Path, encoding: str, folder: Path, args, seed: int, *, sampler: str, early_stopping: bool) -> dict:
    cfg = parse_config(
        {
            "data": {"path": str(data), "encoding": encoding, "validation_split": 0.2},
            "backbone": {"kind": "hf-text", "name_or_path": "minilm"},
            "train": {"epochs": args.epochs, "batch_size": 32, "max_length": 48, "seed": 0},
            "search": {"trials": args.trials, "sampler": sampler, "seed": seed,
                       "early_stopping": early_stopping, "reduction_factor": args.reduction_factor,
                       "max_concurrent_trials": args.concurrency},
            "output": str(folder),
        }
    )  # fmt: skip
    started = time.perf_counter()
    run_search(cfg, load_space(ROOT / "search_spaces" / "minilm-sentiment.yaml"),
               echo=lambda line: print(f"[{sampler} seed {seed}] {line}", file=sys.stderr))  # fmt: skip
    epochs = [json.loads(line) for line in (folder / LOG_FILE).read_text().splitlines()]
    accuracies = [e["val_accuracy"] for e in epochs]
    best = max(accuracies)
    return {"trial_epochs": len(epochs), "best_accuracy": round(best, 4),
            "epochs_to_near_best": epochs_to_near_best(accuracies, best),
            "wall_s": round(time.perf_counter() - started, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--reduction-factor", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    ensure_ray()
    per_seed = []
    with tempfile.TemporaryDirectory(prefix="tl-ray-bench-") as tmp:
        tmp = Path(tmp)
        data, encoding = write_data(tmp, args.per_class, seed=0)
        for seed in args.seeds:
            tpe = search(data, encoding, tmp / f"tpe-{seed}", args, seed, sampler="tpe", early_stopping=True)
            rnd = search(data, encoding, tmp / f"random-{seed}", args, seed, sampler="random", early_stopping=False)
            per_seed.append({"seed": seed, "tpe_asha": tpe, "random_full": rnd})
            print(json.dumps({"benchmark": "search_efficiency", "figure": "seed", **per_seed[-1]}),
                  file=sys.stderr, flush=True)  # fmt: skip

    def mean(strategy: str, key: str) -> float:
        return round(statistics.mean(s[strategy][key] for s in per_seed), 4)

    print(json.dumps({
        "benchmark": "search_efficiency", "trials": args.trials, "max_epochs": args.epochs,
        "reduction_factor": args.reduction_factor, "rows": 2 * args.per_class, "data": data.name,
        "per_seed": per_seed,
        "mean": {s: {k: mean(s, k) for k in ("trial_epochs", "best_accuracy", "epochs_to_near_best")}
                 for s in ("tpe_asha", "random_full")},
        "epochs_ratio": round(mean("tpe_asha", "trial_epochs") / mean("random_full", "trial_epochs"), 3),
        "accuracy_gap_pt": round(100 * (mean("random_full", "best_accuracy") - mean("tpe_asha", "best_accuracy")), 2),
        "goal": "epochs_ratio <= 0.5 and accuracy_gap_pt <= 0.5",
    }))  # fmt: skip


if __name__ == "__main__":
    main()
