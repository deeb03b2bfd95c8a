"""A real multi-node Ray cluster on one machine: `cluster/local.sh up|down|status|stop-node`.

Each node is its own `ray start` (a head plus N workers), with its own CPUs, a custom resource
naming it (`tl_node_head`, `tl_node_w1`, ...), its own temp dir and free ports, and token auth
on with a cluster-specific token. Every process the cluster starts inherits a marker
environment variable (TLRAY_LOCAL_CLUSTER_ID=<uuid>); `down` ends exactly the processes of
this user that carry this cluster's marker (plus the PIDs recorded at `up`), never `ray stop`,
so other Ray instances on the machine are left alone.

State (default ~/.tl-ray/local-cluster, or $TLRAY_CLUSTER_DIR):
    state.json   addresses, ports, node names and the PIDs each `ray start` left running
    auth_token   the cluster's token (mode 600)
    env.sh       `source` it to point `tl-ray submit` / `ray` at this cluster
    r/<node>/    each node's Ray temp dir (logs under r/<node>/session_latest/logs)
    node-cache/<node>/   each node's own disk for fetched frozen-prefix caches: its processes
                 get TL_RAY_CACHE_DIR pointing there, as separate machines would have
                 separate disks (removed by `down`)

Stdlib only, so it runs with any Python that can reach the `ray` executable (it loads
tl_ray/io.py and tl_ray/net.py, both stdlib only, by path). Linux (/proc).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

MARKER = "TLRAY_LOCAL_CLUSTER_ID"
NODE_MARKER = "TLRAY_LOCAL_NODE"
NODE_CACHE_ENV = "TL_RAY_CACHE_DIR"  # tl_ray.train.feature_cache.CACHE_DIR_ENV
STATE_FILE = "state.json"
HEAD_PORTS = ("gcs", "dashboard", "client")
NODE_PORTS = ("node_manager", "object_manager", "agent_http", "agent_grpc", "runtime_env", "metrics")


def _load(name: str):
    """tl_ray/<name>.py by path (io, net: stdlib only), without importing the tl_ray package."""
    path = Path(__file__).resolve().parents[1] / "tl_ray" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"tl_ray_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_io, _net = _load("io"), _load("net")


def _die(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _state_dir() -> Path:
    return Path(os.environ.get("TLRAY_CLUSTER_DIR") or Path.home() / ".tl-ray" / "local-cluster")


def _ray_exe() -> str:
    here = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "ray"
    found = os.environ.get("TLRAY_RAY") or (str(here) if here.exists() else shutil.which("ray"))
    if not found:
        _die("no `ray` executable: install tl-ray (make setup) or set TLRAY_RAY")
    return found


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone, or not ours
        return b""


def cluster_pids(cluster_id: str, recorded: list[int] = (), node: str | None = None) -> list[int]:
    """PIDs of this user's live processes that carry this cluster's marker (and node name)."""
    needles = [f"{MARKER}={cluster_id}".encode()] + ([f"{NODE_MARKER}={node}".encode()] if node else [])
    me, pids = os.getuid(), set()
    candidates = [int(p) for p in os.listdir("/proc") if p.isdigit()] + list(recorded)
    for pid in candidates:
        try:
            if os.stat(f"/proc/{pid}").st_uid != me or pid == os.getpid():
                continue
        except OSError:
            continue
        environ = _environ(pid).split(b"\0")
        if all(needle in environ for needle in needles):
            pids.add(pid)
    return sorted(pids)


def _load_state(directory: Path) -> dict | None:
    path = directory / STATE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _write_state(directory: Path, state: dict) -> None:
    _io.write_json_atomic(directory / STATE_FILE, state)


def _ray_start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    out = log.open("a", encoding="utf-8")
    return subprocess.Popen([_ray_exe(), "start", *args], env=env, stdout=out, stderr=out)


def _wait(started: list[tuple[str, subprocess.Popen]], log: Path) -> None:
    for name, process in started:
        if process.wait() != 0:
            _die(f"`ray start` of node {name} failed (exit {process.returncode}); see {log}")


def _node_args(name: str, cpus: float, gpus: int, temp: Path, ports: dict[str, int]) -> list[str]:
    args = [
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={int(cpus)}",
        f"--num-gpus={gpus}",
        f"--resources={json.dumps({f'tl_node_{name}': 1})}",
        f"--temp-dir={temp}",
        f"--node-manager-port={ports['node_manager']}",
        f"--object-manager-port={ports['object_manager']}",
        f"--dashboard-agent-listen-port={ports['agent_http']}",
        f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
        f"--runtime-env-agent-port={ports['runtime_env']}",
        f"--metrics-export-port={ports['metrics']}",
        "--min-worker-port=0",
        "--max-worker-port=0",
        "--disable-usage-stats",
    ]
    return args


def up(opts: argparse.Namespace) -> None:
    directory = _state_dir()
    state = _load_state(directory)
    if state and cluster_pids(state["cluster_id"], _recorded(state)):
        _die(f"a local cluster is already up in {directory}; run `cluster/local.sh down` first")
    if len(str(directory)) > 60:
        _die(f"state dir {directory} is too long for Ray's socket paths; set TLRAY_CLUSTER_DIR shorter")
    directory.mkdir(parents=True, exist_ok=True)
    token_path = directory / "auth_token"
    if not token_path.is_file():
        token_path.write_text(secrets.token_hex(32), encoding="utf-8")
    token_path.chmod(0o600)
    names = ["head"] + [f"w{i}" for i in range(1, opts.workers + 1)]
    flat = _net.free_ports(len(HEAD_PORTS) + len(NODE_PORTS) * len(names))
    head_ports = dict(zip(HEAD_PORTS, flat[: len(HEAD_PORTS)]))
    cluster_id = uuid.uuid4().hex
    state = {
        "cluster_id": cluster_id,
        "dir": str(directory),
        "token_path": str(token_path),
        "host": opts.host,
        "gcs_address": f"127.0.0.1:{head_ports['gcs']}",
        "dashboard": f"http://127.0.0.1:{head_ports['dashboard']}",
        "client_address": f"ray://127.0.0.1:{head_ports['client']}",
        "nodes": [],
        "started": time.time(),
    }
    _write_state(directory, state)  # so `down` can clean up even if a later start fails
    env = _cluster_env(state)
    log = directory / "ray-start.log"
    started = []
    for index, name in enumerate(names):
        offset = len(HEAD_PORTS) + index * len(NODE_PORTS)
        ports = dict(zip(NODE_PORTS, flat[offset : offset + len(NODE_PORTS)]))
        head = name == "head"
        cpus = opts.head_cpus if head else opts.cpus_per_worker
        gpus = 0 if head else opts.gpus_per_worker
        args = _node_args(name, cpus, gpus, directory / "r" / name, ports)
        if head:
            args = [
                "--head",
                f"--port={head_ports['gcs']}",
                f"--dashboard-port={head_ports['dashboard']}",
                f"--dashboard-host={opts.host}",
                "--include-dashboard=true",
                f"--ray-client-server-port={head_ports['client']}",
            ] + args
        else:
            args = [f"--address={state['gcs_address']}"] + args
        cache_dir = directory / "node-cache" / name
        state["nodes"].append(
            {"name": name, "cpus": cpus, "gpus": gpus, "resource": f"tl_node_{name}", "ports": ports,
             "cache_dir": str(cache_dir)}
        )  # fmt: skip
        node_env = {**env, NODE_MARKER: name, NODE_CACHE_ENV: str(cache_dir)}
        started.append((name, _ray_start(args, node_env, log)))
        if head:  # workers join the head's GCS, so it goes first; the workers start together
            _wait(started, log)
    _wait(started[1:], log)
    time.sleep(0.5)
    for node in state["nodes"]:
        node["pids"] = cluster_pids(cluster_id, node=node["name"])
        node["raylet_pid"] = _raylet(node["pids"])
    _write_state(directory, state)
    (directory / "env.sh").write_text(_env_lines(state), encoding="utf-8")
    print(f"local Ray cluster up: head + {opts.workers} workers ({directory})")
    print(_summary(state))


def _cluster_env(state: dict) -> dict[str, str]:
    """The environment of this cluster's `ray start`s: its marker, token and dashboard."""
    # Nothing of another Ray may leak in: its address, API server or token.
    inherited = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    env = {k: v for k, v in os.environ.items() if k not in inherited}
    ray_bin = str(Path(_ray_exe()).parent)
    env.update(
        {
            MARKER: state["cluster_id"],
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": state["token_path"],
            "RAY_USAGE_STATS_ENABLED": "0",
            # State API calls (Ray Train's placement-group cleaner uses them) must reach this
            # cluster's dashboard, not guess among the Ray instances running on this machine.
            "RAY_API_SERVER_ADDRESS": state["dashboard"],
            "PATH": ray_bin + os.pathsep + env.get("PATH", ""),  # job entrypoints find `python`
        }
    )
    return env


def _raylet(pids: list[int]) -> int | None:
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "raylet":
                return pid
        except OSError:
            continue
    return None


def _recorded(state: dict) -> list[int]:
    return [pid for node in state.get("nodes", []) for pid in node.get("pids", [])]


def _env_lines(state: dict) -> str:
    return (
        f"export RAY_ADDRESS={state['dashboard']}\n"
        f"export RAY_AUTH_MODE=token\n"
        f"export RAY_AUTH_TOKEN_PATH={state['token_path']}\n"
    )


def _summary(state: dict) -> str:
    return "\n".join(
        [
            f"  dashboard / job submission:  {state['dashboard']}   (tl-ray submit --address ...)",
            f"  GCS address (ray.init):      {state['gcs_address']}",
            f"  Ray client:                  {state['client_address']}",
            f"  token:                       {state['token_path']}",
            f"  use it:  source {state['dir']}/env.sh",
            "           (sets RAY_ADDRESS, RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH)",
        ]
    )


def _terminate(pids: list[int], grace_s: float) -> list[int]:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + grace_s
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in alive if Path(f"/proc/{pid}").exists() and not _zombie(pid)]
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return alive


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def down(opts: argparse.Namespace) -> None:
    directory = _state_dir()
    state = _load_state(directory)
    if state is None:
        print(f"no local cluster in {directory}")
        return
    stopped = 0
    for _ in range(3):  # processes may spawn children while we stop them
        pids = cluster_pids(state["cluster_id"], _recorded(state))
        if not pids:
            break
        # raylets and the GCS first: their workers and agents then exit on their own
        _terminate(pids, grace_s=opts.grace)
        stopped += len(pids)
    left = [p for p in cluster_pids(state["cluster_id"], _recorded(state)) if not _zombie(p)]
    (directory / STATE_FILE).unlink(missing_ok=True)
    (directory / "env.sh").unlink(missing_ok=True)
    shutil.rmtree(directory / "node-cache", ignore_errors=True)
    if not opts.keep_logs:
        shutil.rmtree(directory / "r", ignore_errors=True)
    print(f"local Ray cluster down: stopped {stopped} processes" + (f", {len(left)} left: {left}" if left else ""))
    if left:
        sys.exit(1)


def stop_node(opts: argparse.Namespace) -> None:
    """Kill one worker node as a machine failure would: SIGKILL to its raylet and to every
    other process of the node (its workers would otherwise run on until they notice)."""
    state = _load_state(_state_dir()) or _die("no local cluster is up")
    node = next((n for n in state["nodes"] if n["name"] == opts.name), None)
    if node is None or node["name"] == "head":
        _die(f"no worker node {opts.name!r}; nodes: {[n['name'] for n in state['nodes']]}")
    if not node.get("raylet_pid"):
        _die(f"node {opts.name} has no recorded raylet")
    os.kill(node["raylet_pid"], signal.SIGKILL)
    others = [pid for pid in cluster_pids(state["cluster_id"], node=node["name"]) if pid != node["raylet_pid"]]
    for pid in others:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:  # gone already
            pass
    print(f"killed raylet {node['raylet_pid']} and {len(others)} other processes of node {opts.name}")


def start_node(opts: argparse.Namespace) -> None:
    """Start a stopped worker node again (same name, CPUs and GPUs; new ports, a new node id):
    what replacing a failed machine does. The node's leftover processes are stopped first."""
    directory = _state_dir()
    state = _load_state(directory) or _die("no local cluster is up")
    node = next((n for n in state["nodes"] if n["name"] == opts.name and n["name"] != "head"), None)
    if node is None:
        _die(f"no worker node {opts.name!r}; nodes: {[n['name'] for n in state['nodes']]}")
    if _raylet([pid for pid in cluster_pids(state["cluster_id"], node=node["name"]) if not _zombie(pid)]):
        _die(f"node {opts.name} is running; stop it first (`cluster/local.sh stop-node {opts.name}`)")
    _terminate(cluster_pids(state["cluster_id"], node=node["name"]), grace_s=5.0)
    node["restarts"] = node.get("restarts", 0) + 1
    ports = dict(zip(NODE_PORTS, _net.free_ports(len(NODE_PORTS))))
    temp = directory / "r" / f"{node['name']}.{node['restarts']}"  # not the dead node's sockets
    args = [f"--address={state['gcs_address']}", *_node_args(node["name"], node["cpus"], node["gpus"], temp, ports)]
    env = {**_cluster_env(state), NODE_MARKER: node["name"], NODE_CACHE_ENV: node["cache_dir"]}
    log = directory / "ray-start.log"
    _wait([(node["name"], _ray_start(args, env, log))], log)
    time.sleep(0.5)
    node.update(ports=ports, pids=cluster_pids(state["cluster_id"], node=node["name"]))
    node["raylet_pid"] = _raylet(node["pids"])
    _write_state(directory, state)
    print(f"started node {node['name']} again (raylet {node['raylet_pid']})")


def _api(state: dict, path: str):
    token = Path(state["token_path"]).read_text(encoding="utf-8").strip()
    request = urllib.request.Request(
        state["dashboard"] + path, headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def status(opts: argparse.Namespace) -> None:
    directory = _state_dir()
    state = _load_state(directory)
    if state is None:
        print(f"no local cluster in {directory}")
        sys.exit(1)
    pids = cluster_pids(state["cluster_id"], _recorded(state))
    try:
        nodes = _api(state, "/api/v0/nodes?limit=100&detail=true")["data"]["result"]["result"]
    except Exception as error:  # noqa: BLE001 - report any failure to reach the dashboard
        nodes, reason = [], f"dashboard unreachable: {error}"
    else:
        reason = None
    if opts.json:
        print(json.dumps({**state, "processes": len(pids), "ray_nodes": nodes}))
        return
    print(f"local Ray cluster in {directory}: {len(pids)} processes")
    print(_summary(state))
    if reason:
        print(f"  {reason}")
    for node in nodes:
        resources = node.get("resources_total", {})
        name = next((k.removeprefix("tl_node_") for k in resources if k.startswith("tl_node_")), "?")
        print(
            f"  node {name:5s} {node.get('state', '?'):6s} id {node.get('node_id', '?')[:12]}  "
            f"CPU {resources.get('CPU', 0):g}  GPU {resources.get('GPU', 0):g}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cluster/local.sh", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("up", help="start a head and N worker nodes")
    start.add_argument("--workers", type=int, default=2)
    start.add_argument("--cpus-per-worker", type=int, default=1)
    start.add_argument("--gpus-per-worker", type=int, default=0)
    start.add_argument("--head-cpus", type=int, default=0, help="0: the head only schedules")
    start.add_argument("--host", default="127.0.0.1", help="dashboard bind address")
    stop = commands.add_parser("down", help="stop every process this cluster started")
    stop.add_argument("--grace", type=float, default=10.0, help="seconds before SIGKILL")
    stop.add_argument("--keep-logs", action="store_true")
    show = commands.add_parser("status", help="nodes and addresses")
    show.add_argument("--json", action="store_true")
    kill = commands.add_parser("stop-node", help="kill one worker node's raylet (fault drill)")
    kill.add_argument("name", help="w1, w2, ...")
    again = commands.add_parser("start-node", help="start a stopped worker node again")
    again.add_argument("name", help="w1, w2, ...")
    opts = parser.parse_args(argv)
    {"up": up, "down": down, "status": status, "stop-node": stop_node, "start-node": start_node}[opts.command](opts)


if __name__ == "__main__":
    main()
