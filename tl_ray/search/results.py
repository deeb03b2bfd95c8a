"""Collect a search's per-epoch results into trials.parquet and best.json.

Rows come from the search's epoch log (`epochs.jsonl`, one JSON object per reported epoch,
written by `progress.EpochLog` in every launch; searches from before it: Tune's `result.json`
files), joined with the Optuna study's trial states.

Example:
    >>> best = export_results(Path("runs/search"), study, "val_accuracy", "max", max_epochs=3)  # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tl_ray.errors import TLRayError
from tl_ray.io import atomic_path, write_json_atomic
from tl_ray.train.checkpoint import export_model_folder

__all__ = ["BEST_FILE", "TABLE_FILE", "export_results", "read_trials"]

TABLE_FILE = "trials.parquet"
LOG_FILE = "epochs.jsonl"
BEST_FILE = "best.json"
_METRICS = ("epoch", "train_loss", "val_loss", "val_accuracy", "val_f1", "samples_per_s", "lr",
            "val_loss_std", "val_accuracy_std", "val_f1_std")  # *_std: the folds' spread (search.cv_folds)


def _records(folder: Path):
    """Every reported epoch, in the order the driver saw them."""
    log = folder / LOG_FILE
    files = [log] if log.is_file() else sorted(folder.glob("tune_*/*/result.json"))
    for path in files:
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                yield json.loads(line)
            except json.JSONDecodeError:  # a blank line, or one torn by a killed driver
                continue


def _rows(folder: Path) -> list[dict[str, Any]]:
    rows = []
    for record in _records(folder):
        config = dict(record.get("config", {}))
        if "epoch" not in record or "optuna_trial" not in config:
            continue
        config.pop("train_run", None)  # the Train run name, not a parameter
        rows.append(
            {
                "trial": int(config.pop("optuna_trial")),
                "tune_trial_id": record.get("trial_id"),
                "launch": record.get("launch"),
                **{m: record.get(m) for m in _METRICS},
                "checkpoint_path": record.get("checkpoint_path"),
                "params": json.dumps(config, sort_keys=True),
                **{f"param.{k}": v for k, v in config.items()},
            }
        )
    return rows


def _status(study) -> dict[int, str]:
    from tl_ray.search.study import interrupted_numbers

    interrupted = interrupted_numbers(study)
    return {
        trial.number: "interrupted" if trial.number in interrupted else trial.state.name.lower()
        for trial in study.get_trials(deepcopy=False)
    }


def _write_table(rows: list[dict[str, Any]], path: Path) -> None:
    columns = sorted({key for row in rows for key in row})
    # Every row gets every column: a conditional parameter (sampled only `when` its condition
    # holds) is None where it was not sampled, whichever row pyarrow meets first.
    table = pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows]) if rows else pa.table({})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_trials(folder: str | Path) -> pa.Table:
    """The trials table of a finished (or exported) search."""
    path = Path(folder) / TABLE_FILE
    if not path.is_file():
        raise TLRayError(f"{folder} has no {TABLE_FILE}; is it a tl-ray search folder?")
    return pq.read_table(path)


def _on_disk(path: str | None) -> bool:
    return bool(path) and Path(path).is_dir()


def export_results(folder: Path, study, metric: str, mode: str, *, max_epochs: int) -> dict[str, Any]:
    """Write trials.parquet and best.json, export the best model; return best.json's content."""
    from tl_ray.search.study import successors

    statuses = _status(study)
    # An interrupted trial's retry continued its Train run: its epochs are the retry's, and an
    # epoch reported in two launches counts once (the later one).
    successor = successors(study)
    unique: dict[tuple[int, int], dict[str, Any]] = {}
    for row in _rows(folder):
        row["trial"] = successor.get(row["trial"], row["trial"])
        unique[row["trial"], row["epoch"]] = row
    rows = sorted(unique.values(), key=lambda r: (r["trial"], r["epoch"]))
    last_epoch: dict[int, int] = {}
    for row in rows:
        last_epoch[row["trial"]] = max(last_epoch.get(row["trial"], 0), row["epoch"])
    for row in rows:
        status = statuses.get(row["trial"], "unknown")
        if status == "complete" and last_epoch[row["trial"]] < max_epochs:
            status = "pruned"  # ASHA stopped it before the last epoch
        row["status"] = status
    _write_table(rows, folder / TABLE_FILE)

    scored = [r for r in rows if r.get(metric) is not None and r["status"] != "interrupted"]
    if not scored:
        raise TLRayError(f"no trial in {folder} reported {metric}; see the trial errors above")
    sign = 1 if mode == "max" else -1
    # Ties go to a row whose checkpoint still exists (Ray keeps only the best N), then the later epoch.
    best = max(scored, key=lambda r: (sign * r[metric], _on_disk(r["checkpoint_path"]), r["epoch"]))
    summary = {
        "study": study.study_name,
        "trial": best["trial"],
        "epoch": best["epoch"],
        "metric": metric,
        "mode": mode,
        "value": best[metric],
        "params": json.loads(best["params"]),
        "metrics": {m: best[m] for m in _METRICS},
        "checkpoint": best["checkpoint_path"],
        "model": None,
        "trials": len(last_epoch),
        "pruned": sum(1 for t in last_epoch if any(r["trial"] == t and r["status"] == "pruned" for r in rows)),
    }
    if best["checkpoint_path"] and Path(best["checkpoint_path"]).is_dir():
        summary["model"] = str(export_model_folder(best["checkpoint_path"], folder / "model"))
    write_json_atomic(folder / BEST_FILE, summary)
    return summary
