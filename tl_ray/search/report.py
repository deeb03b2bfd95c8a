"""Summaries and plots of a finished search, read from trials.parquet.

Example:
    >>> rows = trial_summary("runs/search")          # doctest: +SKIP
    >>> paths = write_plots("runs/search")           # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tl_ray.io import atomic_path
from tl_ray.search.results import BEST_FILE, read_trials

__all__ = ["trial_summary", "write_plots"]


def _best_info(folder: Path) -> tuple[str, str]:
    best = json.loads((folder / BEST_FILE).read_text(encoding="utf-8"))
    return best["metric"], best["mode"]


def trial_summary(folder: str | Path) -> list[dict[str, Any]]:
    """One row per trial: its best epoch's metric, epochs run, status and parameters, best first."""
    folder = Path(folder)
    metric, mode = _best_info(folder)
    trials: dict[int, dict[str, Any]] = {}
    sign = 1 if mode == "max" else -1
    for row in read_trials(folder).to_pylist():
        entry = trials.setdefault(
            row["trial"],
            {"trial": row["trial"], "status": row["status"], "epochs": 0, metric: None,
             "params": json.loads(row["params"])},
        )
        entry["epochs"] = max(entry["epochs"], row["epoch"])
        value = row.get(metric)
        if value is not None and (entry[metric] is None or sign * value > sign * entry[metric]):
            entry[metric] = value
    missing = float("-inf")
    return sorted(trials.values(), key=lambda r: -sign * (r[metric] if r[metric] is not None else sign * missing))


def write_plots(folder: str | Path) -> list[Path]:
    """optimisation_history.png, lr_vs_depth.png and learning_curves.png in the folder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    metric, mode = _best_info(folder)
    summary = sorted(trial_summary(folder), key=lambda r: r["trial"])
    rows = read_trials(folder).to_pylist()
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    values = [r[metric] for r in summary]
    best_so_far, best = [], None
    for v in values:
        if v is not None and (best is None or (v > best if mode == "max" else v < best)):
            best = v
        best_so_far.append(best)
    ax.scatter([r["trial"] for r in summary], values, label=f"trial {metric}")
    ax.step([r["trial"] for r in summary], best_so_far, where="post", color="C1", label="best so far")
    ax.set(xlabel="trial", ylabel=metric, title="Optimisation history")
    ax.legend()
    paths.append(_save(fig, folder / "optimisation_history.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    lrs = [r["params"].get("train.lr") for r in summary]
    depths = [r["params"].get("backbone.unfreeze_depth") for r in summary]
    points = [(lr, d, v) for lr, d, v in zip(lrs, depths, values) if None not in (lr, d, v)]
    if points:
        scatter = ax.scatter([p[0] for p in points], [p[1] for p in points], c=[p[2] for p in points], cmap="viridis", s=60)
        fig.colorbar(scatter, ax=ax, label=metric)
        ax.set_xscale("log")
    ax.set(xlabel="learning rate", ylabel="unfreeze depth", title=f"Learning rate vs unfreeze depth ({metric})")
    paths.append(_save(fig, folder / "lr_vs_depth.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for trial in summary:
        curve = sorted((r["epoch"], r[metric]) for r in rows if r["trial"] == trial["trial"] and r[metric] is not None)
        style = "--" if trial["status"] == "pruned" else "-"
        ax.plot([e for e, _ in curve], [v for _, v in curve], style, marker="o", label=f"trial {trial['trial']}")
    ax.set(xlabel="epoch", ylabel=metric, title="Learning curves (dashed: stopped early)")
    if len(summary) <= 12:
        ax.legend(fontsize="small")
    paths.append(_save(fig, folder / "learning_curves.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path
