"""The demo search's overhead: trials in their own process against a Ray Train run per trial.

Runs the demo search (examples/minilm-sentiment.yaml with search_spaces/minilm-sentiment.yaml,
on the 200 sentences that ship inside gensim: 6 trials, 2 at a time) once with
`search.trial_runner: in-process` and once with `ray-train`, one after the other in this
process, same seed. One JSON line per way:

    wall_s      the search's wall time (run_search, from the first trial to best.json)
    compute_s   the sum of every reported epoch's `epoch_s` (training and validation)
    overhead    1 - compute_s / (wall_s x concurrent trials)

and a last line with `wall_ratio` = ray-train wall / in-process wall.
Goals: overhead <= 0.15 in-process; wall_ratio >= 2.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/search_overhead.py
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import gensim

from tl_ray.config import apply_overrides, load_config, parse_config
from tl_ray.search.results import LOG_FILE
from tl_ray.search.space import load_space
from tl_ray.search.tune import run_search
from tl_ray.train.driver import ensure_ray

ROOT = Path(__file__).resolve().parents[1]
DEMO_DATA = Path(gensim.__file__).parent / "test" / "test_data" / "pang_lee_polarity.cor"


def one_search(runner: str, folder: Path, args) -> dict:
    data = folder / "pang_lee_polarity.txt"
    folder.mkdir(parents=True)
    shutil.copyfile(DEMO_DATA, data)
    base = load_config(ROOT / "examples" / "minilm-sentiment.yaml").model_dump()
    cfg = parse_config(apply_overrides(base, [
        f"data.path={data}", f"output={folder / 'search'}", f"search.trial_runner={runner}",
        f"search.trials={args.trials}", f"search.max_concurrent_trials={args.concurrency}",
    ]))  # fmt: skip
    started = time.perf_counter()
    best = run_search(cfg, load_space(ROOT / "search_spaces" / "minilm-sentiment.yaml"),
                      echo=lambda line: print(f"[{runner}] {line}", file=sys.stderr))  # fmt: skip
    wall = time.perf_counter() - started
    epochs = [json.loads(line) for line in (folder / "search" / LOG_FILE).read_text().splitlines()]
    compute = sum(e["epoch_s"] for e in epochs if e.get("epoch_s") is not None)
    return {"benchmark": "search_overhead", "trial_runner": runner, "trials": args.trials,
            "concurrent": args.concurrency, "trial_epochs": len(epochs), "wall_s": round(wall, 1),
            "compute_s": round(compute, 1),
            "overhead": round(1 - compute / (wall * args.concurrency), 3),
            "best_val_accuracy": best["metrics"]["val_accuracy"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--runners", nargs="+", default=["in-process", "ray-train"])
    args = parser.parse_args()
    ensure_ray()
    figures = {}
    with tempfile.TemporaryDirectory(prefix="tl-ray-bench-") as tmp:
        for runner in args.runners:
            figures[runner] = one_search(runner, Path(tmp) / runner, args)
            print(json.dumps({**figures[runner], "goal": "overhead <= 0.15 (in-process)"}), flush=True)
    if {"in-process", "ray-train"} <= set(figures):
        print(json.dumps({"benchmark": "search_overhead", "figure": "wall_ratio",
                          "wall_ratio": round(figures["ray-train"]["wall_s"] / figures["in-process"]["wall_s"], 2),
                          "goal": ">= 2"}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
