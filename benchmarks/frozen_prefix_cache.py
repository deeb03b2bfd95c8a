"""Frozen-prefix cache: epoch wall time and a small depth search, cached vs uncached.

For unfreeze_depth 0, 1, 2 and full (6) on the bundled MiniLM, two real Ray Train runs each
(`train.cache` true / false, same seed and data), one after the other in this one process;
prints one JSON line per depth with the mean epoch time after the first (training and
validation, from the `epoch_s` metric of every epoch's checkpoint), the cache build time and
both runs' wall time. Then the same small Optuna search over lr and depth 0..2, with and
without the cache, and one JSON line with both wall times.
Goals: depth 0 epochs >= 10x faster; depth 2 of 6 >= 2.5x; the search >= 2x end to end.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/frozen_prefix_cache.py
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/frozen_prefix_cache.py --per-class 128 --depths 0 2
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/frozen_prefix_cache.py --depths     # the search only

Data: sentences from ../shared/data/mr when present, else the 200 that ship inside gensim.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_efficiency import write_data  # noqa: E402  (same data as the search benchmark)

from tl_ray.config import parse_config  # noqa: E402
from tl_ray.search.space import load_space  # noqa: E402
from tl_ray.search.tune import run_search  # noqa: E402
from tl_ray.train.checkpoint import read_manifest  # noqa: E402
from tl_ray.train.driver import ensure_ray, train  # noqa: E402

SPACE = {
    "metric": "val_accuracy",
    "mode": "max",
    "params": {
        "train.lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-3, "log": True},
        "backbone.unfreeze_depth": {"type": "int", "low": 0, "high": 2},
    },
}


def config(data: Path, encoding: str, output: Path, args, **train) -> dict:
    return {
        "data": {"path": str(data), "encoding": encoding, "validation_split": 0.2},
        "backbone": {"kind": "hf-text", "name_or_path": "minilm"},
        "train": {"epochs": args.epochs, "batch_size": 32, "max_length": args.max_length,
                  "seed": 0, "keep_checkpoints": args.epochs, "lr": 3e-4, **train},
        "search": {"trials": args.trials, "seed": 0, "max_concurrent_trials": 2},
        "output": str(output),
    }  # fmt: skip


def timed_run(raw: dict, depth: int | None, cache: bool) -> dict:
    raw = {**raw, "backbone": {**raw["backbone"], "unfreeze_depth": depth}}
    raw["train"] = {**raw["train"], "cache": cache}
    started = time.perf_counter()
    train(parse_config(raw))
    wall = time.perf_counter() - started
    output = Path(raw["output"])
    epochs = sorted(
        (read_manifest(p.parent)["metrics"] for p in output.glob("train_*/checkpoint_*/manifest.json")),
        key=lambda m: m["epoch"],
    )
    meta = list(output.glob("cache/*/meta.json"))
    return {
        "epoch_s": [round(m["epoch_s"], 2) for m in epochs],
        "later_epoch_s": statistics.mean(m["epoch_s"] for m in epochs[1:]),
        "val_accuracy": epochs[-1]["val_accuracy"],
        "wall_s": round(wall, 1),
        "cache_mb": round(json.loads(meta[0].read_text())["bytes"] / 2**20, 1) if meta else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=320, help="rows per class (MR data)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--depths", type=int, nargs="*", default=[0, 1, 2, 6], help="none: only the search")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--skip-search", action="store_true")
    args = parser.parse_args()
    ensure_ray()
    with tempfile.TemporaryDirectory(prefix="tl-ray-bench-") as tmp:
        tmp = Path(tmp)
        data, encoding = write_data(tmp, args.per_class, seed=0)
        for depth in args.depths:
            runs = {}
            for cache in (True, False):
                raw = config(data, encoding, tmp / f"d{depth}-{cache}", args)
                runs[cache] = timed_run(raw, depth, cache)
            speedup = runs[False]["later_epoch_s"] / runs[True]["later_epoch_s"]
            goal = {0: ">= 10x", 2: ">= 2.5x"}.get(depth, "none")
            print(json.dumps({"benchmark": "frozen_prefix_cache", "figure": "epoch_time",
                              "unfreeze_depth": depth, "layers": 6, "rows": 2 * args.per_class,
                              "cached": runs[True], "uncached": runs[False],
                              "speedup_later_epochs": round(speedup, 2), "goal": goal}), flush=True)  # fmt: skip
        if args.skip_search:
            return
        space_file = tmp / "space.yaml"
        space_file.write_text(yaml.safe_dump(SPACE), encoding="utf-8")
        walls = {}
        for cache in (True, False):
            cfg = parse_config(config(data, encoding, tmp / f"search-{cache}", args, cache=cache))
            started = time.perf_counter()
            best = run_search(cfg, load_space(space_file), echo=lambda line: print(line, file=sys.stderr))
            walls[cache] = {"wall_s": round(time.perf_counter() - started, 1),
                            "best_val_accuracy": best["metrics"]["val_accuracy"]}  # fmt: skip
        print(json.dumps({"benchmark": "frozen_prefix_cache", "figure": "depth_search",
                          "trials": args.trials, "epochs": args.epochs, "cached": walls[True],
                          "uncached": walls[False], "goal": ">= 2x",
                          "speedup": round(walls[False]["wall_s"] / walls[True]["wall_s"], 2)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
