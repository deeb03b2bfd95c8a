"""A real 3-node Ray cluster on this machine (cluster/local.sh), driven through `tl-ray submit`.

The head schedules only (0 CPUs); two worker nodes hold 1 CPU each, so two concurrent trials
must run on two different nodes. One module-scoped cluster serves every test; a finalizer
always tears it down by its own process ids.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import json_lines, run_tl_ray

ROOT = Path(__file__).resolve().parents[2]
LOCAL_SH = ROOT / "cluster" / "local.sh"
pytestmark = pytest.mark.slow

SPACE = """
metric: val_accuracy
mode: max
params:
  train.lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
"""


def _local_cluster_module():
    spec = importlib.util.spec_from_file_location("local_cluster", ROOT / "cluster" / "local_cluster.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _local(args: list[str], state_dir: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "TLRAY_CLUSTER_DIR": str(state_dir), "TLRAY_PYTHON": sys.executable}
    done = subprocess.run([str(LOCAL_SH), *args], env=env, capture_output=True, text=True, timeout=240)
    if check and done.returncode != 0:
        raise AssertionError(f"local.sh {args} failed:\n{done.stdout}\n{done.stderr}")
    return done


@pytest.fixture(scope="module")
def cluster():
    state_dir = Path(tempfile.mkdtemp(prefix="tlrc-", dir="/tmp"))  # short: Ray socket paths
    try:
        _local(["up", "--workers", "2", "--cpus-per-worker", "1", "--head-cpus", "0"], state_dir)
        state = json.loads((state_dir / "state.json").read_text())
        status = json.loads(_local(["status", "--json"], state_dir).stdout)
        names = {}
        for node in status["ray_nodes"]:
            tag = next(k for k in node["resources_total"] if k.startswith("tl_node_"))
            names[node["node_id"]] = tag.removeprefix("tl_node_")
        yield {**state, "state_dir": state_dir, "node_names": names}
    finally:
        _local(["down", "--grace", "5"], state_dir, check=False)
        shutil.rmtree(state_dir, ignore_errors=True)


def client_env(cluster, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"RAY_ADDRESS": cluster["dashboard"], "RAY_AUTH_TOKEN_PATH": cluster["token_path"], **extra})
    return env


def tl_ray(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 240):
    done = run_tl_ray(*args, env=env, cwd=cwd, timeout=timeout)
    return done, json_lines(done.stdout)  # without the job's log lines


def follow(cluster, job: str, cwd: Path, timeout: float = 480) -> dict:
    """`tl-ray jobs logs JOB --follow`; on a time-out, fail with the tail of the job's log."""
    env = client_env(cluster)
    try:
        done, lines = tl_ray(["jobs", "logs", job, "--follow"], env, cwd, timeout=timeout)
    except subprocess.TimeoutExpired:
        logs, _ = tl_ray(["jobs", "logs", job], env, cwd)
        pytest.fail(f"job {job} still running after {timeout:.0f} s; log tail:\n{logs.stdout[-4000:]}")
    assert lines and "status" in lines[-1], done.stdout[-3000:] + done.stderr[-2000:]
    return {**lines[-1], "returncode": done.returncode, "log": done.stdout}


def write_run(
    folder: Path, tiny_bert: str, csv: Path, output: Path, storage: str | None = None,
    backbone: dict | None = None, **train,
) -> Path:
    options = {"epochs": 1, "batch_size": 16, "max_length": 32, "num_workers": 1, **train}
    backbone = {"kind": "hf-text", "name_or_path": tiny_bert, "pooling": "mean", **(backbone or {})}
    (folder / "run.yaml").write_text(
        f"data: {{path: {csv}, validation_split: 0.25}}\n"
        f"backbone: {json.dumps(backbone)}\n"
        f"train: {json.dumps(options)}\n"
        "search: {trials: 2, sampler: random, seed: 1, early_stopping: false, max_concurrent_trials: 2}\n"
        f"output: {output}\n" + (f"storage_path: {storage}\n" if storage else ""),
        encoding="utf-8",
    )
    return folder / "run.yaml"


def test_submitted_search_runs_trials_on_several_nodes(cluster, tiny_bert, sentiment_csv, tmp_path):
    job_dir = tmp_path / "job"  # the shipped working dir: two small YAML files
    job_dir.mkdir()
    output = tmp_path / "search"
    write_run(job_dir, tiny_bert, sentiment_csv, output)
    (job_dir / "space.yaml").write_text(SPACE, encoding="utf-8")

    done, lines = tl_ray(
        ["submit", "--env", "HF_HUB_OFFLINE=1", "--", "tune", "run.yaml", "--space", "space.yaml"],
        client_env(cluster), cwd=job_dir,
    )
    assert done.returncode == 0 and lines[0]["submission_id"].startswith("raysubmit_"), done.stderr
    final = follow(cluster, lines[0]["submission_id"], tmp_path)
    assert final["status"] == "SUCCEEDED" and final["returncode"] == 0, final["log"][-4000:]
    for name in ("search.json", "study.db", "trials.parquet", "best.json", "model"):
        assert (output / name).exists(), name
    best = json.loads((output / "best.json").read_text())
    assert best["trials"] == 2 and best["model"]
    node_ids = set()
    for result_file in output.glob("tune_*/*/result.json"):
        node_ids |= {json.loads(line)["node_id"] for line in result_file.read_text().splitlines() if line}
    assert len(node_ids) == 2, node_ids
    assert {cluster["node_names"][n] for n in node_ids} == {"w1", "w2"}

    done, lines = tl_ray(["jobs", "status", lines[0]["submission_id"]], client_env(cluster), cwd=tmp_path)
    assert done.returncode == 0 and lines[0]["status"] == "SUCCEEDED"
    done, lines = tl_ray(["jobs", "list"], client_env(cluster), cwd=tmp_path)
    assert any(line["entrypoint"].endswith("tune run.yaml --space space.yaml") for line in lines)


def test_submission_without_the_token_fails_clearly(cluster, tmp_path):
    env = client_env(cluster, HOME=str(tmp_path))  # no ~/.ray/auth_token there
    env.pop("RAY_AUTH_TOKEN_PATH")
    done, _ = tl_ray(["submit", "--image-only", "--", "--help"], env, cwd=tmp_path)
    assert done.returncode == 2
    assert "requires a token and none was found" in done.stderr and "RAY_AUTH_TOKEN" in done.stderr
    assert "Traceback" not in done.stderr

    done, _ = tl_ray(["jobs", "list"], client_env(cluster, RAY_AUTH_TOKEN="not-the-token"), cwd=tmp_path)
    assert done.returncode == 2 and "rejected the token from RAY_AUTH_TOKEN" in done.stderr


def test_unknown_job_and_failed_job_exit_codes(cluster, tmp_path):
    env = client_env(cluster)
    done, _ = tl_ray(["jobs", "logs", "no-such-job"], env, cwd=tmp_path)
    assert done.returncode == 2 and "no job 'no-such-job'" in done.stderr
    done, lines = tl_ray(["submit", "--image-only", "--follow", "--", "train", "/nonexistent.yaml"], env, cwd=tmp_path)
    assert done.returncode == 2 and lines[-1]["status"] == "FAILED"
    assert "error: job raysubmit_" in done.stderr and "FAILED: Job entrypoint command failed" in done.stderr
    assert "config file not found: /nonexistent.yaml" in done.stderr  # the job's own log


PROBE = """
import sys
from tl_ray.errors import ConfigError
from tl_ray.storage import check_reachable
from tl_ray.train.driver import ensure_ray
ensure_ray()
check_reachable(sys.argv[1])  # one machine: every node sees the marker
try:
    check_reachable(sys.argv[1], marker_name="written-by-nobody")  # as a node-local disk would look
except ConfigError as error:
    print(error)
"""


def test_storage_check_probes_every_node(cluster, tmp_path):
    env = client_env(cluster, RAY_ADDRESS=cluster["gcs_address"], RAY_AUTH_MODE="token", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "shared")], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    message = done.stdout.strip().splitlines()[-1]
    assert message.startswith(f"storage_path {tmp_path / 'shared'} is not shared: node ")
    assert "and 1 more" in message and "NFS" in message and "s3://" in message
    assert list((tmp_path / "shared").iterdir()) == []  # the probe marker is cleaned up


def test_workers_read_the_cache_from_their_own_node(cluster, tiny_bert, sentiment_csv, tmp_path):
    """A 2-worker run (one worker per worker node) with a frozen bottom and a `file://`
    storage_path: the cache is published once under the storage, never in the driver's
    output, and each worker node fetches its own copy into its own node-local root
    (TL_RAY_CACHE_DIR, distinct per node) and trains from it."""
    output, storage = tmp_path / "train", tmp_path / "ckpt"
    run = write_run(tmp_path, tiny_bert, sentiment_csv, output, f"file://{storage}",
                    backbone={"unfreeze_depth": 1}, num_workers=2, epochs=1)  # fmt: skip
    done, lines = tl_ray(["submit", "--image-only", "--env", "HF_HUB_OFFLINE=1", "--", "train", str(run)],
                         client_env(cluster), cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    final = follow(cluster, lines[0]["submission_id"], tmp_path)
    assert final["status"] == "SUCCEEDED" and final["returncode"] == 0, final["log"][-4000:]
    assert (output / "model" / "manifest.json").is_file() and not (output / "cache").exists()

    published = [p.parent for p in storage.glob("cache/*/meta.json")]
    assert len(published) == 1, list(storage.rglob("*"))
    files = {p.name: p.read_bytes() for p in published[0].iterdir()}
    roots = {node["name"]: Path(node["cache_dir"]) for node in cluster["nodes"]}
    assert len(set(roots.values())) == 3
    for name in ("w1", "w2"):  # each trained from a copy on its own disk, byte for byte
        copy = roots[name] / published[0].name
        assert {p.name: p.read_bytes() for p in copy.iterdir()} == files, name
        assert not list(roots[name].glob(".*.tmp")), name  # no half-fetched or scratch folder
    assert not (roots["head"] / published[0].name).exists()  # the driver fetches nothing
    manifest = json.loads(next(storage.glob("train_*/checkpoint_*/manifest.json")).read_text())
    assert manifest["metrics"]["epoch"] == 1


def _first_checkpoint(storage: Path) -> Path | None:
    """The newest checkpoint once Ray Train has registered one (its snapshot file is written
    after registration; a folder alone may still be in flight and would not be resumed from)."""
    if not any(storage.glob("train_*/checkpoint_manager_snapshot.json")):
        return None
    found = sorted(storage.glob("train_*/checkpoint_*/manifest.json"))
    return found[-1] if found else None


def _node_names(cluster) -> dict[str, str]:
    """Ray node id -> local.sh node name (head, w1, ...), of the nodes alive now."""
    status = json.loads(_local(["status", "--json"], cluster["state_dir"]).stdout)
    names = {}
    for node in status["ray_nodes"]:
        tag = next((k for k in node["resources_total"] if k.startswith("tl_node_")), None)
        if tag and node.get("state") == "ALIVE":
            names[node["node_id"]] = tag.removeprefix("tl_node_")
    return names


def _epoch_rows(output: Path) -> list[dict]:
    """The search's epoch log (epochs.jsonl) so far; a line being written is skipped."""
    path = output / "epochs.jsonl"
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def test_worker_node_loss_during_a_search(cluster, tiny_bert, sentiment_csv, tmp_path):
    """The drill: a submitted search of two trials, one on each worker node; a node is killed
    once both trials have reported an epoch. The search finishes, the lost trial restarts on
    the other node from its last checkpoint, and no (trial, epoch) is written twice. Then
    `local.sh start-node` brings the node back for the tests after this one."""
    import pyarrow.parquet as pq

    job_dir, output = tmp_path / "job", tmp_path / "search"
    job_dir.mkdir()
    write_run(job_dir, tiny_bert, sentiment_csv, output, epochs=6)
    (job_dir / "space.yaml").write_text(SPACE, encoding="utf-8")
    done, lines = tl_ray(["submit", "--env", "HF_HUB_OFFLINE=1", "--", "tune", "run.yaml", "--space", "space.yaml"],
                         client_env(cluster), cwd=job_dir)  # fmt: skip
    assert done.returncode == 0, done.stderr
    names = cluster["node_names"]
    deadline = time.monotonic() + 300
    while len({r["node_id"] for r in _epoch_rows(output) if r["epoch"] < 6}) < 2:
        if time.monotonic() > deadline:
            logs, _ = tl_ray(["jobs", "logs", lines[0]["submission_id"]], client_env(cluster), tmp_path)
            pytest.fail(f"no two trials part-way on two nodes: {_epoch_rows(output)}\n{logs.stdout[-3000:]}")
        time.sleep(0.2)
    first = min((r for r in _epoch_rows(output) if r["epoch"] < 6), key=lambda r: r["epoch"])
    victim, trial = names[first["node_id"]], first["config"]["optuna_trial"]
    _local(["stop-node", victim], cluster["state_dir"])
    killed_at = len(_epoch_rows(output))
    try:
        final = follow(cluster, lines[0]["submission_id"], tmp_path)
        assert final["status"] == "SUCCEEDED" and final["returncode"] == 0, final["log"][-4000:]
        rows = pq.read_table(output / "trials.parquet").to_pylist()
        keys = [(r["trial"], r["epoch"]) for r in rows]
        assert len(keys) == len(set(keys)), "an epoch is written twice in trials.parquet"
        assert sorted(keys) == [(t, e) for t in sorted({k[0] for k in keys}) for e in range(1, 7)], keys
        assert {r["status"] for r in rows} == {"complete"} and len({k[0] for k in keys}) == 2
        best = json.loads((output / "best.json").read_text())
        assert best["trials"] == 2 and best["model"]
        # Epochs trained after the loss (not the resumed-from epoch, reported again as it was).
        after = [r for r in _epoch_rows(output)[killed_at:]
                 if r["config"]["optuna_trial"] == trial and 0 < r["resumed_from_epoch"] < r["epoch"]]  # fmt: skip
        seen = [(r["config"]["optuna_trial"], r["epoch"], r["resumed_from_epoch"], names.get(r["node_id"]))
                for r in _epoch_rows(output)]  # fmt: skip
        assert after and all(names.get(r["node_id"]) != victim for r in after), (trial, killed_at, seen)
        print(json.dumps({"drill": "node-loss-search", "node": victim, "trial": trial,
                          "epochs_after_loss": sorted(r["epoch"] for r in after)}))
    finally:
        _local(["start-node", victim], cluster["state_dir"])
        deadline = time.monotonic() + 60
        while victim not in _node_names(cluster).values():
            assert time.monotonic() < deadline, f"{victim} did not rejoin the cluster"
            time.sleep(0.5)
        cluster["node_names"] = {**names, **_node_names(cluster)}  # the new node id too


def test_worker_node_loss_during_training(cluster, tiny_bert, sentiment_csv, tmp_path):
    """Kill the node a submitted training run is on: Ray Train restarts the worker group on
    the other node from the last checkpoint; checkpoints written before the loss remain.
    Checkpoints go to a `file://` URI storage_path (pyarrow), the model is copied back."""
    output, storage = tmp_path / "train", tmp_path / "ckpt"
    run = write_run(tmp_path, tiny_bert, sentiment_csv, output, f"file://{storage}",
                    epochs=16, max_failures=2, keep_checkpoints=20)  # fmt: skip
    env = client_env(cluster)
    done, lines = tl_ray(["submit", "--image-only", "--env", "HF_HUB_OFFLINE=1", "--", "train", str(run)], env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    job = lines[0]["submission_id"]
    deadline = time.monotonic() + 300
    while (manifest := _first_checkpoint(storage)) is None and time.monotonic() < deadline:
        time.sleep(0.3)
    assert manifest is not None, "no checkpoint within 300 s"
    killed = json.loads(manifest.read_text())["metrics"]["node_id"]  # the node that wrote it
    node = cluster["node_names"][killed]
    assert node in ("w1", "w2")
    _local(["stop-node", node], cluster["state_dir"])
    before = {p.parent.name for p in storage.glob("train_*/checkpoint_*/manifest.json")}

    final = follow(cluster, job, tmp_path)
    assert final["status"] == "SUCCEEDED" and final["returncode"] == 0, final["log"][-4000:]
    after = {p.parent.name for p in storage.glob("train_*/checkpoint_*/manifest.json")}
    assert before <= after, "a checkpoint written before the node loss disappeared"
    metrics = [json.loads(p.read_text())["metrics"] for p in storage.glob("train_*/checkpoint_*/manifest.json")]
    names = cluster["node_names"]
    epochs = sorted((m["epoch"], m["resumed_from_epoch"], names.get(m["node_id"], "?")) for m in metrics)
    # Trained after a resume; the epoch resumed from is reported (and saved) once more as it was.
    resumed = [m for m in metrics if 0 < m["resumed_from_epoch"] < m["epoch"]]
    assert resumed, f"the run never resumed after {node} was killed: {epochs}"
    assert all(m["node_id"] != killed for m in resumed), epochs  # the retry ran on the other node
    start = min(m["resumed_from_epoch"] for m in resumed)
    assert start in {m["epoch"] for m in metrics if m["node_id"] == killed}, epochs  # its checkpoint
    assert {m["epoch"] for m in resumed} == set(range(start + 1, 17)), epochs  # the lost epochs, redone
    assert {m["epoch"] for m in metrics} == set(range(1, 17)), epochs  # nothing lost, none skipped
    assert (output / "model" / "manifest.json").is_file()
    print(json.dumps({"drill": "node-loss-training", "node": node, "resumed_from_epoch": start,
                      "epochs_after_loss": len({m["epoch"] for m in resumed}), "of_epochs": 16}))


def test_down_leaves_no_process_of_its_own(cluster):
    module = _local_cluster_module()
    assert module.cluster_pids(cluster["cluster_id"]), "the cluster should be running before down"
    _local(["down", "--grace", "5"], cluster["state_dir"])
    assert module.cluster_pids(cluster["cluster_id"]) == []
    assert not (cluster["state_dir"] / "state.json").exists()
