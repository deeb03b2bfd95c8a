"""Collect a search's per-epoch results into trials.parquet and best.json.

Rows come from Ray Tune's `result.json` files (one JSON object per reported epoch) in every
launch of the search, joined with the Optuna study's trial states.

Example:
    >>> best = export_results(Path("runs/search"), study, "val_accuracy", "max", max_epochs=3)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tl_ray.errors import TLRayError
from tl_ray.io import write_json_atomic
from tl_ray.train.checkpoint import export_model_folder

__all__ = ["BEST_FILE", "TABLE_FILE", "export_results", "read_trials"]

TABLE_FILE = "trials.parquet"
BEST_FILE = "best.json"
_METRICS = ("epoch", "train_loss", "val_loss", "val_accuracy", "val_f1", "samples_per_s", "lr")


def _rows(folder: Path) -> list[dict[str, Any]]:
    rows = []
    for result_file in sorted(folder.glob("tune_*/*/result.json")):
        for line in result_file.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            config = dict(record.get("config", {}))
            if "epoch" not in record or "optuna_trial" not in config:
                continue
            rows.append(
                {
                    "trial": int(config.pop("optuna_trial")),
                    "tune_trial_id": record.get("trial_id"),
                    **{m: record.get(m) for m in _METRICS},
                    "checkpoint_path": record.get("checkpoint_path"),
                    "params": json.dumps(config, sort_keys=True),
                    **{f"param.{k}": v for k, v in config.items()},
                }
            )
    return rows


def _status(study) -> dict[int, str]:
    statuses = {}
    for trial in study.get_trials(deepcopy=False):
        state = trial.state.name.lower()
        if trial.user_attrs.get("interrupted"):
            state = "interrupted"
        statuses[trial.number] = state
    return statuses


def _write_table(rows: list[dict[str, Any]], path: Path) -> None:
    columns = sorted({key for row in rows for key in row})
    table = pa.Table.from_pylist(rows, schema=None).select(columns) if rows else pa.table({})
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    statuses = _status(study)
    rows = _rows(folder)
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
