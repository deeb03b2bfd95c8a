"""Training throughput: the Ray Train path vs a plain single-process PyTorch loop.

Both paths train the same backbone (default: bundled MiniLM, full fine-tune) on the same
data, batch size, max length and intra-op thread count, in ONE process run:

1. plain: a single-process PyTorch loop in this (driver) process, BEFORE Ray is started,
   so no Ray daemon competes with it for the CPU. It runs the torch loop's own epoch
   (`tl_ray.train.step.TrainStep.epoch`: `backbone.preprocess` per batch inside the timed
   window, as in the Ray loop, then forward, cross-entropy, backward, grad-norm clip, AdamW
   step, schedule step) over the loop's batches of an in-memory shard (`TableShard`, the
   in-process trial's: a seeded permutation of the training rows each epoch). No validation
   pass (it is outside the Ray loop's timed window too).
2. ray: `ray.init(num_cpus=threads)`, then `tl_ray.train.driver.build_trainer(...).fit()`
   with 1 worker holding `threads` CPUs. Cluster start is excluded.

Each path trains `--epochs` epochs; the figure compared is the LAST epoch's training-phase
samples/s (epoch 1 is warm-up). For Ray that is the `samples_per_s` the worker loop reports
(training samples / training-phase wall time; validation and checkpointing are outside).
With `--rounds R > 1` the two paths alternate (plain, ray, plain, ray, ...; plain rounds after
the first run with the idle Ray cluster up) and the medians are compared.

Usage (from the repository root):
    .venv/bin/python benchmarks/train_throughput.py                 # defaults: 512 samples
    .venv/bin/python benchmarks/train_throughput.py --samples 128 --epochs 2

Progress goes to stderr; stdout gets exactly one JSON line:
    {"benchmark": "train_throughput", "model": ..., "unfreeze_depth": ..., "batch_size": ...,
     "max_length": ..., "threads": ..., "samples": ..., "ray_samples_per_s": ...,
     "plain_samples_per_s": ..., "ratio": ray/plain, "goal": ">= 0.9", ...diagnostics}
Diagnostics after "goal": per-epoch figures of both paths and the per-round ratio; the
niceness and torch/OMP thread counts seen inside a Ray worker of the same shape; the mean
padded tokens per sample of each path's last epoch (batch composition sets the padded length,
hence the compute); and CPU accounting of each last epoch (`cpu_last_epoch_*`: cores used by
the training process, by the rest of this benchmark's process tree, i.e. the Ray daemons and
actors, and by foreign processes) with samples per CPU-second and a `contended` flag.

Fairness notes:
* Priority: Ray starts its worker processes at nice 15 (`RAY_worker_niceness`), while this
  process (the plain loop) runs at nice 0. On a machine where anything else runs, the Ray
  worker then loses CPU to every normal-priority process. By default (`--ray-niceness match`)
  the benchmark sets RAY_worker_niceness to this process's niceness; `--ray-niceness
  ray-default` measures Ray's default instead. Both are recorded in the JSON.
* Threads: Ray sets OMP_NUM_THREADS = the worker's CPU count, so torch in the worker (also in
  Ray Train's TrainingThread) uses `--threads` intra-op threads, as the plain loop does.
* Shared machines: samples/s follows the CPU share each path gets; when `contended` is true
  (foreign processes used > 0.2 cores in a timed epoch) treat the ratio as noise, use
  `--rounds 3`, or rerun on a quiet machine.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MR_DIR = Path("/work/shared/data/mr")
CONTENDED_CORES = 0.2  # foreign CPU use (cores) in a timed epoch above which figures are flagged

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_accounting import cpu_snapshot, cpu_split, load_snapshot, report_clock  # noqa: E402


def log(message: str) -> None:
    print(f"[train_throughput] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ data


def _balanced(texts: list[str], labels: list[str], n: int) -> tuple[list[str], list[str]]:
    """First n/2 rows of each of two classes, interleaved (neg, pos, neg, pos, ...)."""
    names = sorted(set(labels))
    per_class = {name: [t for t, lab in zip(texts, labels) if lab == name] for name in names}
    half = n // 2
    picked: list[tuple[str, str]] = []
    for i in range(max(len(v) for v in per_class.values())):
        for name in names:
            if i < half and i < len(per_class[name]):
                picked.append((per_class[name][i], name))
    return [t for t, _ in picked], [lab for _, lab in picked]


def build_csv(folder: Path, samples: int) -> tuple[Path, str]:
    """A UTF-8 CSV (text,label) of `samples` balanced rows; returns (path, source name)."""
    if MR_DIR.is_dir():
        source = str(MR_DIR)
        texts, labels = [], []
        for name in ("neg", "pos"):
            raw = (MR_DIR / f"rt-polarity.{name}").read_bytes().decode("latin-1")
            lines = [line.strip() for line in raw.splitlines() if line.strip()]
            texts += lines
            labels += [name] * len(lines)
    else:
        import gensim

        from tl_ray.data import read_table

        path = Path(gensim.__file__).parent / "test" / "test_data" / "pang_lee_polarity.cor"
        source = str(path)
        table = read_table(path, encoding="latin-1")
        texts, labels = table.column("text").to_pylist(), table.column("label").to_pylist()
    texts, labels = _balanced(texts, labels, samples)
    if len(texts) < samples:
        log(f"only {len(texts)} balanced rows available in {source} (asked for {samples})")
    out = folder / "data.csv"
    with out.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(zip(texts, labels))
    return out, source


# ------------------------------------------------------------------------------ plain path


def padded_tokens_per_sample(backbone: Any, batches: list[list[str]], max_length: int) -> float:
    """Mean padded sequence length per sample over `batches` (what the model computes on)."""
    tokens = samples = 0
    for texts in batches:
        ids = backbone.preprocess(texts, max_length)["input_ids"]
        tokens += ids.numel()
        samples += ids.shape[0]
    return tokens / max(1, samples)


def run_plain(cfg: Any, datasets: Any, threads: int) -> dict[str, Any]:
    """Train with tl_ray.train.loop's own step (`TrainStep`), single process, no Ray; per-epoch samples/s."""
    import torch

    from tl_ray.backbones.registry import get_backbone
    from tl_ray.train.loop import _batches  # the loop's batching, over the in-process trial's shard
    from tl_ray.train.session import TableShard
    from tl_ray.train.step import TrainStep

    torch.set_num_threads(threads)
    tcfg = cfg.train
    torch.manual_seed(tcfg.seed)
    device = torch.device("cpu")
    shard = TableShard(datasets.train)  # seeded: a fresh permutation of the rows each epoch
    total_steps = math.ceil(datasets.train.num_rows / tcfg.batch_size) * tcfg.epochs

    backbone = get_backbone(cfg.backbone)
    model = backbone.build(num_labels=len(datasets.labels))
    backbone.apply_unfreeze(model)
    step = TrainStep.build(backbone, model, model, cfg, total_steps=total_steps, device=device)

    def inputs_of(batch: dict[str, Any]) -> dict[str, Any]:  # the loop's, without a feature cache
        return backbone.preprocess(list(batch["text"]), tcfg.max_length)

    per_epoch: list[float] = []
    cpu: dict[str, float] = {}
    for epoch in range(1, tcfg.epochs + 1):
        before = cpu_snapshot(os.getpid()) if epoch == tcfg.epochs else None
        started = time.perf_counter()
        seen, loss_sum = step.epoch(_batches(shard, tcfg.batch_size, tcfg.seed + epoch), inputs_of)
        _ = loss_sum.item()  # the loop reads it once an epoch too
        elapsed = time.perf_counter() - started
        if before is not None:
            cpu = cpu_split(before, cpu_snapshot(os.getpid()), os.getpid())
        per_epoch.append(seen / elapsed)
        log(f"plain epoch {epoch}: {seen} samples in {elapsed:.2f}s = {seen / elapsed:.1f} samples/s")
    last = _batches(shard, tcfg.batch_size, tcfg.seed + tcfg.epochs)  # the same order again
    tokens = padded_tokens_per_sample(backbone, [list(batch["text"]) for batch in last], tcfg.max_length)
    threads_used = torch.get_num_threads()
    del model, step
    gc.collect()
    log(f"plain last epoch CPU use (cores): {cpu}")
    return {"per_epoch": per_epoch, "tokens_per_sample": tokens, "torch_threads": threads_used, "cpu": cpu}


# ------------------------------------------------------------------------------ ray path


def probe_ray_worker_threads(threads: int) -> dict[str, Any]:
    """torch/OMP thread counts inside a Ray actor holding `threads` CPUs (= a train worker)."""
    import ray

    @ray.remote(num_cpus=threads)
    class _Probe:
        def threads(self) -> dict[str, Any]:
            import torch

            return {
                "nice": os.nice(0),
                "torch_threads": torch.get_num_threads(),
                "torch_interop_threads": torch.get_num_interop_threads(),
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            }

    actor = _Probe.remote()
    try:
        return ray.get(actor.threads.remote())
    finally:
        ray.kill(actor)  # give its CPUs back before the trainer asks for them


def ray_tokens_per_sample(cfg: Any, datasets: Any) -> float:
    """Replay the Ray loop's last-epoch batch order on the driver (Ray Data, same shuffle
    args) and measure its padded tokens per sample; tokenisation only, no training."""
    import ray

    from tl_ray.backbones.registry import get_backbone

    tcfg = cfg.train
    backbone = get_backbone(cfg.backbone)
    dataset = ray.data.from_arrow(datasets.train)
    batches = [
        list(batch["text"])
        for batch in dataset.iter_batches(
            batch_size=tcfg.batch_size,
            batch_format="numpy",
            local_shuffle_buffer_size=4 * tcfg.batch_size,
            local_shuffle_seed=tcfg.seed + tcfg.epochs,
        )
    ]
    return padded_tokens_per_sample(backbone, batches, tcfg.max_length)


def run_ray(cfg: Any, datasets: Any, storage: Path, round_no: int) -> dict[str, Any]:
    from tl_ray.train.driver import build_trainer

    clock_file = storage.parent / f"report-clock-{round_no}.jsonl"
    trainer = build_trainer(
        cfg, datasets, storage_path=str(storage), name=f"bench-{round_no}",
        callbacks=[report_clock(clock_file, os.getpid())],
    )
    fit_start = cpu_snapshot(os.getpid())
    started = time.perf_counter()
    result = trainer.fit()
    fit_wall = time.perf_counter() - started
    if result.error is not None:
        raise RuntimeError(f"Ray training failed: {result.error}")
    last = result.metrics  # the latest report = the last epoch (every epoch reports)
    per_epoch = []
    frame = result.metrics_dataframe  # kept checkpoints only: keep_checkpoints = epochs
    if frame is not None and "epoch" in frame:
        frame = frame.sort_values("epoch")
        per_epoch = [float(v) for v in frame["samples_per_s"]]
    for epoch, value in enumerate(per_epoch, 1):
        log(f"ray epoch {epoch}: {value:.1f} samples/s")
    if last is None or int(last["epoch"]) != cfg.train.epochs:
        raise RuntimeError(f"unexpected last metrics from Ray: {last!r}")
    # CPU use between the last two reports: the last epoch's training phase plus its
    # validation and checkpoint (the worker's timed window is the first rows/sps seconds).
    cpu: dict[str, Any] = {}
    report_gaps: list[float] = []
    if clock_file.is_file():
        snaps = [fit_start] + [load_snapshot(line) for line in clock_file.read_text().splitlines()]
        report_gaps = [round(b["time"] - a["time"], 2) for a, b in zip(snaps, snaps[1:])]
        before, after = snaps[-2], snaps[-1]
        workers = [
            pid for pid, (name, _, mine) in after["procs"].items() if mine and "RayTrainWorker" in name
        ]
        cpu = cpu_split(before, after, workers[0] if len(workers) == 1 else None)
        cpu["train_phase_s"] = round(datasets.train.num_rows / float(last["samples_per_s"]), 2)
        log(f"ray last epoch CPU use (cores, between the last two reports): {cpu}")
    return {
        "last": float(last["samples_per_s"]), "per_epoch": per_epoch, "fit_wall_s": fit_wall,
        "cpu": cpu, "report_gaps_s": report_gaps,
    }


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=512, help="rows in the data set (train + 10%% validation)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--unfreeze-depth", type=int, default=6, help="6 = full fine-tune of MiniLM")
    parser.add_argument("--epochs", type=int, default=2, help="the last epoch is the one compared")
    parser.add_argument("--threads", type=int, default=2, help="torch threads = Ray worker CPUs")
    parser.add_argument("--model", default="minilm", help="backbone.name_or_path")
    parser.add_argument("--rounds", type=int, default=1, help="alternate plain/ray this many times; medians compared")
    parser.add_argument(
        "--ray-niceness",
        choices=("match", "ray-default"),
        default="match",
        help="match: start Ray workers at this process's niceness (RAY_worker_niceness), so both "
        "paths get the same CPU priority; ray-default: leave Ray's default (workers at nice 15)",
    )
    args = parser.parse_args(argv)
    if args.samples < 4 or args.batch_size < 1 or args.epochs < 1 or args.threads < 1 or args.rounds < 1:
        parser.error("--samples >= 4, --batch-size/--epochs/--threads/--rounds >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Keep stdout for the JSON line alone: everything else written to fd 1 (Ray worker logs
    # forwarded to the driver, library prints, child processes) goes to stderr.
    json_out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    wall_started = time.perf_counter()

    from tl_ray.config import parse_config
    from tl_ray.data import load_datasets

    with tempfile.TemporaryDirectory(prefix="tl-ray-bench-") as tmp:
        tmp_path = Path(tmp)
        data_path, source = build_csv(tmp_path, args.samples)
        cfg = parse_config(
            {
                "data": {"path": str(data_path), "validation_split": 0.1},
                "backbone": {"kind": "hf-text", "name_or_path": args.model, "unfreeze_depth": args.unfreeze_depth},
                "train": {
                    "epochs": args.epochs,
                    "batch_size": args.batch_size,
                    "max_length": args.max_length,
                    "num_workers": 1,
                    "cpus_per_worker": float(args.threads),
                    "use_gpu": False,
                    "seed": 0,
                    # keep every epoch's checkpoint so result.metrics_dataframe holds every
                    # epoch (deletion would only happen after a report anyway)
                    "keep_checkpoints": args.epochs,
                    "max_failures": 0,
                },
                "output": str(tmp_path / "out"),
            }
        )
        datasets = load_datasets(cfg.data, seed=cfg.train.seed)
        rows, val_rows = datasets.train.num_rows, datasets.validation.num_rows
        log(f"data: {source} -> {rows} train / {datasets.validation.num_rows} validation rows")

        plain_runs: list[dict[str, Any]] = []
        ray_runs: list[dict[str, Any]] = []
        probe: dict[str, Any] = {}
        ray_tokens = float("nan")
        for round_no in range(1, args.rounds + 1):
            log(f"round {round_no}: plain PyTorch loop ({args.threads} threads)")
            plain_runs.append(run_plain(cfg, datasets, args.threads))

            if round_no == 1:
                import ray

                if args.ray_niceness == "match":
                    os.environ.setdefault("RAY_worker_niceness", str(os.nice(0)))
                log(
                    f"starting Ray (num_cpus={args.threads}, RAY_worker_niceness="
                    f"{os.environ.get('RAY_worker_niceness', 'unset: Ray default')}); not timed"
                )
                ray.init(num_cpus=args.threads, logging_level=logging.WARNING, log_to_driver=True)
                probe = probe_ray_worker_threads(args.threads)
                log(f"Ray worker with {args.threads} CPUs sees {probe}")
                if probe.get("torch_threads") != args.threads:
                    log(
                        f"WARNING: Ray worker torch threads {probe.get('torch_threads')} != "
                        f"--threads {args.threads}; the comparison is not like for like"
                    )
            log(f"round {round_no}: Ray Train (1 worker x {args.threads} CPUs)")
            ray_runs.append(run_ray(cfg, datasets, tmp_path / "ray", round_no))

        ray_tokens = ray_tokens_per_sample(cfg, datasets)
        import ray

        ray.shutdown()

    plain_last = statistics.median(run["per_epoch"][-1] for run in plain_runs)
    ray_last = statistics.median(run["last"] for run in ray_runs)
    plain_tokens = plain_runs[0]["tokens_per_sample"]
    ratio = ray_last / plain_last
    # Samples per CPU-second of the training process: less sensitive to other users' load
    # than samples/s (for Ray, the CPU rate between the last two reports x training time).
    plain_cpu_eff = statistics.median(
        rows / (run["cpu"]["train_cores"] * run["cpu"]["window_s"]) for run in plain_runs
    )
    ray_cpu_eff = statistics.median(
        rows / (run["cpu"]["train_cores"] * run["cpu"]["train_phase_s"]) if run["cpu"] else float("nan")
        for run in ray_runs
    )
    foreign = max(run["cpu"].get("foreign_cores", 0.0) for run in plain_runs + ray_runs)
    contended = foreign > CONTENDED_CORES
    if contended:
        log(
            f"WARNING: other processes used up to {foreign:.2f} cores during the timed epochs; "
            "samples/s figures are contended (see cpu_last_epoch_*); rerun on a quiet machine"
        )
    record = {
        "benchmark": "train_throughput",
        "model": args.model,
        "unfreeze_depth": args.unfreeze_depth,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "threads": args.threads,
        "samples": rows + val_rows,  # = --samples unless the data source had fewer
        "ray_samples_per_s": round(ray_last, 2),
        "plain_samples_per_s": round(plain_last, 2),
        "ratio": round(ratio, 3),
        "goal": ">= 0.9",
        # diagnostics
        "train_rows_per_epoch": rows,
        "epochs": args.epochs,
        "rounds": args.rounds,
        "order": "plain (before ray.init), then ray" + (", alternating" if args.rounds > 1 else ""),
        "data_source": source,
        "plain_nice": os.nice(0),
        "ray_worker_nice": probe.get("nice"),
        "ray_worker_torch_threads": probe.get("torch_threads"),
        "ray_worker_omp_num_threads": probe.get("OMP_NUM_THREADS"),
        "plain_torch_threads": plain_runs[0]["torch_threads"],
        "ratio_per_round": [
            round(r["last"] / q["per_epoch"][-1], 3) for q, r in zip(plain_runs, ray_runs)
        ],
        "ray_epochs_samples_per_s": [[round(v, 2) for v in run["per_epoch"]] for run in ray_runs],
        "plain_epochs_samples_per_s": [[round(v, 2) for v in run["per_epoch"]] for run in plain_runs],
        "ray_fit_wall_s": [round(run["fit_wall_s"], 1) for run in ray_runs],
        "ray_report_gaps_s": [run["report_gaps_s"] for run in ray_runs],
        "cpu_last_epoch_plain": [run["cpu"] for run in plain_runs],
        "cpu_last_epoch_ray": [run["cpu"] for run in ray_runs],
        "plain_tokens_per_sample": round(plain_tokens, 2),
        "ray_tokens_per_sample": round(ray_tokens, 2),
        "ratio_per_token": round(ratio * ray_tokens / plain_tokens, 3),
        "ray_samples_per_cpu_s": round(ray_cpu_eff, 3),
        "plain_samples_per_cpu_s": round(plain_cpu_eff, 3),
        "ratio_per_cpu_s": round(ray_cpu_eff / plain_cpu_eff, 3),
        "contended": contended,
        "wall_s": round(time.perf_counter() - wall_started, 1),
    }
    log(f"ratio ray/plain = {ratio:.3f} (goal >= 0.9)")
    json_out.write(json.dumps(record) + "\n")
    json_out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
