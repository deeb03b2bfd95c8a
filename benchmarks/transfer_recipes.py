"""Which transfer recipe wins on held-out data: fixed depths, gradual unfreezing, or a search.

Data: the sentence polarity dataset of Pang & Lee (../shared/data/mr, Latin-1). One seeded
draw (`--data-seed`) gives 1,800 training sentences and 1,000 test sentences, disjoint and
balanced. The test sentences never choose anything: every recipe picks its checkpoint (and
the search its trial) on a validation split of the 1,800 (`--validation-split`, default 0.2).

Recipes, all through tl-ray itself on the bundled MiniLM (6 layers), same epochs, batch
size, max length and schedule; `--seeds` seeds each (the seed draws the validation split,
the head's initial weights and the batch order):
  * head:     unfreeze_depth 0, the encoder frozen (feature extraction), head_lr 1e-2
  * depth-2:  the top 2 layers train at lr 1e-4, the head at 1e-3
  * depth-6:  all 6 encoder layers train (full fine-tuning; embeddings frozen), same rates
  * gradual:  ULMFiT's gradual unfreezing from the top: depth 2, 4, 6 in epochs 1, 2, 3
              (`unfreeze_schedule: {gradual: {start: 1, every: 1, step: 2}}` from depth 2)
  * search:   `tl-ray tune` with the shipped space (search_spaces/minilm-sentiment.yaml:
              lr, head_lr, depth 0-6, fixed or gradual schedule, ...), TPE + ASHA,
              `--trials` trials, choosing on validation accuracy; one search per seed
The head and encoder rates were set from the validation figures in issue 19 (head only:
1e-2 best of 1e-4/1e-3/1e-2), not from this benchmark's test set.

stdout: one JSON line per run (recipe, seed, test and validation accuracy, training time),
one per recipe (mean and spread over seeds), and one with the goals:
    {"benchmark": "transfer_recipes", "figure": "goals", "search_minus_best_fixed": ...,
     "search_minus_full": ..., "gradual_minus_full": ...}

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/transfer_recipes.py              # about 45 min on 2 cores
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/transfer_recipes.py --seeds 1 --trials 4 --recipes head search
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

ROOT = Path(__file__).resolve().parents[1]
MR = ROOT.parent / "shared" / "data" / "mr"
SPACE = ROOT / "search_spaces" / "minilm-sentiment.yaml"
NAMES = {0: "neg", 1: "pos"}

RECIPES: dict[str, dict] = {
    "head": {"backbone": {"unfreeze_depth": 0}, "train": {"lr": 1e-2, "head_lr": 1e-2}},
    "depth-2": {"backbone": {"unfreeze_depth": 2}, "train": {"lr": 1e-4, "head_lr": 1e-3}},
    "depth-6": {"backbone": {"unfreeze_depth": 6}, "train": {"lr": 1e-4, "head_lr": 1e-3}},
    "gradual": {"backbone": {"unfreeze_depth": 2, "unfreeze_schedule": {"gradual": {"start": 1, "every": 1, "step": 2}}},
                "train": {"lr": 1e-4, "head_lr": 1e-3}},
}
FULL = "depth-6"


def emit(payload: dict) -> None:
    print(json.dumps({"benchmark": "transfer_recipes", **payload}, sort_keys=True), flush=True)


def read_mr(folder: Path, train_n: int, test_n: int, seed: int) -> tuple[list, list]:
    """Balanced, disjoint training and test draws of (sentence, label name)."""
    per_class: dict[int, list[str]] = {}
    for name, label in (("rt-polarity.neg", 0), ("rt-polarity.pos", 1)):
        path = folder / name
        if not path.is_file():
            sys.exit(f"error: {path} not found; this benchmark needs ../shared/data/mr")
        lines = [line.strip() for line in path.read_text(encoding="latin-1").splitlines() if line.strip()]
        random.Random(seed * 10 + label).shuffle(lines)
        per_class[label] = lines
    train = [(t, NAMES[y]) for y in (0, 1) for t in per_class[y][: train_n // 2]]
    test = [(t, NAMES[y]) for y in (0, 1) for t in per_class[y][train_n // 2 : train_n // 2 + test_n // 2]]
    random.Random(seed).shuffle(train)
    return train, test


def write_csv(path: Path, rows: list) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def base_config(args, data: Path, output: Path, seed: int) -> dict:
    return {
        "data": {"path": str(data), "validation_split": args.validation_split},
        "backbone": {"kind": "hf-text", "name_or_path": "minilm"},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "max_length": args.max_length,
                  "seed": seed, "metric": "val_accuracy", "schedule": args.schedule,
                  "cpus_per_worker": args.cpus},
        "search": {"trials": args.trials, "seed": seed},
        "output": str(output),
    }


def merged(base: dict, recipe: dict) -> dict:
    return {**base, **{k: {**base.get(k, {}), **v} for k, v in recipe.items()}}


def test_accuracy(model_dir: str | Path, test: list) -> float:
    from tl_ray.serve.predictor import Predictor

    predictor = Predictor(model_dir, batch_size=128, device="cpu")
    predicted = predictor.predict([t for t, _ in test])
    return sum(p["label"] == label for p, (_, label) in zip(predicted, test)) / len(test)


def run_fixed(name: str, args, data: Path, work: Path, test: list, seed: int) -> dict:
    from tl_ray.config import parse_config
    from tl_ray.train.driver import train

    cfg = parse_config(merged(base_config(args, data, work / f"{name}-{seed}", seed), RECIPES[name]))
    started = time.perf_counter()
    outcome = train(cfg)
    seconds = time.perf_counter() - started
    return {"val_accuracy": outcome.metrics["val_accuracy"], "train_s": seconds,
            "test_accuracy": test_accuracy(outcome.model_dir, test), "epoch": outcome.metrics["epoch"]}


def run_search(args, data: Path, work: Path, test: list, seed: int) -> dict:
    from tl_ray.config import parse_config
    from tl_ray.search.space import load_space
    from tl_ray.search.tune import run_search as search

    cfg = parse_config(base_config(args, data, work / f"search-{seed}", seed))
    started = time.perf_counter()
    best = search(cfg, load_space(SPACE), echo=lambda line: print(line, file=sys.stderr, flush=True))
    seconds = time.perf_counter() - started
    return {"val_accuracy": best["value"], "train_s": seconds, "test_accuracy": test_accuracy(best["model"], test),
            "epoch": best["epoch"], "params": best["params"], "trials": best["trials"], "pruned": best["pruned"]}


def summary(name: str, runs: list[dict]) -> dict:
    tests = [r["test_accuracy"] for r in runs]
    return {"figure": "recipe", "recipe": name, "seeds": len(runs),
            "test_accuracy_mean": round(statistics.fmean(tests), 4),
            "test_accuracy_sd": round(statistics.stdev(tests), 4) if len(tests) > 1 else None,
            "val_accuracy_mean": round(statistics.fmean(r["val_accuracy"] for r in runs), 4),
            "train_s_mean": round(statistics.fmean(r["train_s"] for r in runs), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=1800)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--validation-split", type=float, default=0.2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--schedule", default="linear")
    parser.add_argument("--cpus", type=float, default=2.0, help="CPUs of a fixed recipe's worker")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--search-seeds", type=int, default=1, help="searches (one per seed)")
    parser.add_argument("--recipes", nargs="*", default=[*RECIPES, "search"], choices=[*RECIPES, "search"])
    args = parser.parse_args()

    from tl_ray.train.driver import ensure_ray

    train_rows, test = read_mr(MR, args.train, args.test, args.data_seed)
    ensure_ray(None)
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="transfer-recipes-") as tmp:
        work = Path(tmp)
        data = write_csv(work / "train.csv", train_rows)
        for name in args.recipes:
            seeds = range(args.search_seeds if name == "search" else args.seeds)
            for seed in seeds:
                run = run_search(args, data, work, test, seed) if name == "search" else \
                    run_fixed(name, args, data, work, test, seed)  # fmt: skip
                results.setdefault(name, []).append(run)
                emit({"figure": "run", "recipe": name, "seed": seed, **{k: round(v, 4) if isinstance(v, float) else v
                                                                        for k, v in run.items()}})
            emit(summary(name, results[name]))
    means = {name: statistics.fmean(r["test_accuracy"] for r in runs) for name, runs in results.items()}
    fixed = {n: m for n, m in means.items() if n != "search"}
    goals: dict = {"figure": "goals", "train_sentences": args.train, "test_sentences": args.test,
                   "epochs": args.epochs}
    if "search" in means and fixed:
        best_fixed = max(fixed, key=fixed.get)
        goals.update(best_fixed=best_fixed, search_minus_best_fixed=round(100 * (means["search"] - fixed[best_fixed]), 2))
    if "search" in means and FULL in means:
        goals["search_minus_full"] = round(100 * (means["search"] - means[FULL]), 2)  # goal: >= +1 point
    if "gradual" in means and FULL in means:
        goals["gradual_minus_full"] = round(100 * (means["gradual"] - means[FULL]), 2)
    emit(goals)


if __name__ == "__main__":
    main()
