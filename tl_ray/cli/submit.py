"""`tl-ray submit [--address ADDR] [options] -- COMMAND ARGS...`: run a tl-ray command as a Ray job.

Example:
    tl-ray submit --address http://head:8265 --follow -- tune run.yaml --space space.yaml
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from tl_ray.cli.app import app, emit
from tl_ray.errors import ConfigError

_opt = typer.Option


def _env_vars(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--env expects KEY=VALUE, got {item!r}")
        env[key] = value
    return env


def finish(info: dict) -> None:
    """Print the final status line; a job that did not succeed is an error (exit code 2)."""
    from tl_ray.jobs import JobError

    emit(info)
    if info["status"] != "SUCCEEDED":
        reason = (info.get("message") or "").strip().splitlines()
        raise JobError(f"job {info['submission_id']} {info['status']}" + (f": {reason[0]}" if reason else ""))


@app.command(context_settings={"allow_interspersed_args": False})
def submit(
    command: list[str] = typer.Argument(..., help="The tl-ray command to run, after --."),
    address: Optional[str] = _opt(None, help="Job server (dashboard) address; default RAY_ADDRESS."),
    working_dir: Path = _opt(Path("."), help="Folder shipped to the cluster (cwd of the job)."),
    image_only: bool = _opt(False, "--image-only", help="Ship nothing: use tl-ray as installed on the cluster."),
    pip: list[str] = _opt([], "--pip", help="A requirement to pip install for the job (repeatable)."),
    env: list[str] = _opt([], "--env", help="KEY=VALUE environment variable for the job (repeatable)."),
    num_cpus: Optional[float] = _opt(None, help="CPUs reserved for the entrypoint (the driver)."),
    num_gpus: Optional[float] = _opt(None, help="GPUs reserved for the entrypoint (the driver)."),
    submission_id: Optional[str] = _opt(None, help="Choose the submission id (default: Ray's)."),
    follow: bool = _opt(False, "--follow", help="Stream the logs until the job ends; exit 2 unless it SUCCEEDED."),
) -> None:
    """Submit any tl-ray command (train, tune, serve, ...) as a job on a Ray cluster."""
    from tl_ray.jobs import JobsClient, SubmitOptions, prepare_submission

    if image_only and pip:
        raise ConfigError("--image-only ships nothing; drop --pip or --image-only")
    for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)  # packaging chatter; errors still show
    options = SubmitOptions(
        working_dir=None if image_only else str(working_dir),
        pip=list(pip),
        env_vars=_env_vars(env),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        submission_id=submission_id,
    )
    prepared = prepare_submission(list(command), options)  # paths and symlinks: before any upload
    client = JobsClient(address)
    job = client.submit(prepared)
    emit({"submission_id": job, "address": client.address, "status": "PENDING"})
    if follow:
        finish(client.follow(job, lambda text: print(text, end="", file=sys.stderr, flush=True)))
