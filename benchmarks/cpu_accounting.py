"""CPU accounting for benchmarks on a shared machine: who used the cores in a timed window.

The machine may be shared (other users' jobs), and Ray runs daemons beside its worker; a
snapshot at each window edge of every process's CPU time tells who used the cores.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["cpu_snapshot", "cpu_split", "load_snapshot", "report_clock"]


def cpu_snapshot(root_pid: int) -> dict[str, Any]:
    """Wall time, machine-wide busy CPU-seconds, and CPU-seconds of every process by pid,
    marking the descendants of `root_pid` (this benchmark's process tree, Ray included)."""
    import psutil

    with open("/proc/stat") as handle:
        ticks = [int(v) for v in handle.readline().split()[1:]]
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
    try:
        ours = {root_pid} | {p.pid for p in psutil.Process(root_pid).children(recursive=True)}
    except psutil.Error:
        ours = {root_pid}
    procs = {}
    for proc in psutil.process_iter(["cmdline", "name"]):
        try:
            times = proc.cpu_times()
            name = " ".join(proc.info["cmdline"] or []) or proc.info["name"] or ""
            procs[proc.pid] = (name[:200], times.user + times.system, proc.pid in ours)
        except psutil.Error:
            continue
    return {"time": time.time(), "busy": busy, "procs": procs}


def _short(cmdline: str) -> str:
    """`ray::SplitCoordinator`, `raylet`, `dashboard.py`: a readable process name."""
    words = cmdline.split(" ")
    word = next((w for w in words if w.endswith(".py")), words[0])
    return word.rsplit("/", 1)[-1][:40]


def cpu_split(before: dict[str, Any], after: dict[str, Any], trainer_pid: int | None) -> dict[str, float]:
    """Average cores used between two snapshots: by the training process, by the rest of this
    benchmark's process tree (Ray daemons and actors), and by everything else (foreign).
    A process that exited in between is missed (its CPU lands in `foreign`); a process that
    started in between is counted in full."""
    wall = max(1e-9, after["time"] - before["time"])
    train = ours = 0.0
    others: list[tuple[float, str]] = []
    for pid, (name, cpu, mine) in after["procs"].items():
        used = cpu - before["procs"].get(pid, (name, 0.0, mine))[1]
        if pid == trainer_pid:
            train += used
        elif mine and used > 0:
            others.append((used, _short(name)))
        if mine:
            ours += used
    total = after["busy"] - before["busy"]
    return {
        "window_s": round(wall, 2),
        "train_cores": round(train / wall, 2),
        "other_ours_cores": round((ours - train) / wall, 2),
        "foreign_cores": round(max(0.0, total - ours) / wall, 2),
        "top_other_ours": [[name, round(used / wall, 3)] for used, name in sorted(others, reverse=True)[:6]],
    }


def report_clock(path: Path, root_pid: int) -> Any:
    """A UserCallback that appends a CPU snapshot per reported epoch to `path`; it runs in
    the Ray Train controller actor, on this machine, so a local file is how it hands back."""
    import ray.train
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the controller lacks benchmarks/ on its path

    class ReportClock(ray.train.UserCallback):
        def __init__(self, path: str, root_pid: int) -> None:
            self.path, self.root_pid = path, root_pid

        def after_report(self, run_context, metrics, checkpoint) -> None:  # noqa: ANN001
            snap = cpu_snapshot(self.root_pid)
            snap["epoch"] = int(metrics[0]["epoch"])
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(snap) + "\n")

    return ReportClock(str(path), root_pid)


def load_snapshot(line: str) -> dict[str, Any]:
    snap = json.loads(line)
    snap["procs"] = {int(pid): tuple(value) for pid, value in snap["procs"].items()}
    return snap
