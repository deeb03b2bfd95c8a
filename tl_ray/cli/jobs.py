"""`tl-ray jobs list|status|logs|stop [ID] [--address ADDR]`: the jobs on a Ray cluster."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from tl_ray.cli.app import app, emit

jobs_app = typer.Typer(help="List, inspect, follow and stop Ray jobs.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
_address = typer.Option(None, help="Job server (dashboard) address; default RAY_ADDRESS.")


def _client(address: Optional[str]):
    from tl_ray.jobs import JobsClient

    return JobsClient(address)


@jobs_app.command("list")
def list_jobs(address: Optional[str] = _address) -> None:
    """One JSON line per job, oldest first."""
    for info in _client(address).list():
        emit(info)


@jobs_app.command()
def status(job: str = typer.Argument(..., help="Submission id."), address: Optional[str] = _address) -> None:
    """The job's status and message."""
    emit(_client(address).status(job))


@jobs_app.command()
def logs(
    job: str = typer.Argument(..., help="Submission id."),
    address: Optional[str] = _address,
    follow: bool = typer.Option(False, "--follow", "-f", help="Stream until the job ends; exit 2 unless it SUCCEEDED."),
) -> None:
    """Print the job's logs (driver stdout and stderr)."""
    client = _client(address)
    if not follow:
        print(client.logs(job), end="")
        return
    from tl_ray.cli.submit import finish

    info = client.follow(job, lambda text: print(text, end="", flush=True))
    print(file=sys.stdout)
    finish(info)


@jobs_app.command()
def stop(job: str = typer.Argument(..., help="Submission id."), address: Optional[str] = _address) -> None:
    """Ask the job to stop; prints whether it was still running."""
    client = _client(address)
    emit({"submission_id": job, "stop_requested": client.stop(job)})
