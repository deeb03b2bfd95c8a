"""Run tl-ray commands as Ray jobs on a remote cluster (a JobSubmissionClient wrapper).

The address comes from `--address` or RAY_ADDRESS (the dashboard, e.g. http://HEAD:8265).
The token is found the way Ray finds it: RAY_AUTH_TOKEN, then the file RAY_AUTH_TOKEN_PATH,
then ~/.ray/auth_token; it is sent as a bearer header, so RAY_AUTH_MODE need not be set here.

Example:
    >>> jobs = JobsClient("http://127.0.0.1:8265")                         # doctest: +SKIP
    >>> sid = jobs.submit(["tune", "run.yaml", "--space", "space.yaml"])  # doctest: +SKIP
    >>> jobs.status(sid)["status"]                                         # doctest: +SKIP
    'RUNNING'
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from tl_ray.errors import ConfigError, TLRayError

__all__ = [
    "DEFAULT_EXCLUDES",
    "JobError",
    "JobsClient",
    "SubmitOptions",
    "find_token",
    "resolve_address",
    "runtime_env",
]

# Never shipped with --working-dir: environments, results, caches, VCS data.
DEFAULT_EXCLUDES = [
    ".git", ".venv", "venv", "runs", "**/__pycache__", "*.egg-info", ".pytest_cache",
    "build", "dist", "*.pyc", "node_modules", ".mypy_cache", ".ruff_cache",
]  # fmt: skip
_SKIP_DIRS = {".git", ".venv", "venv", "runs", "__pycache__", ".pytest_cache", "build", "dist",
              "node_modules", ".mypy_cache", ".ruff_cache"}  # fmt: skip
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
_TOKEN_SOURCES = "RAY_AUTH_TOKEN, the file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token"


class JobError(TLRayError):
    """A job could not be submitted, found or followed, or the cluster refused us."""


def resolve_address(address: str | None) -> str:
    """The job server address: `address`, else RAY_ADDRESS; `http://` added when bare.

    >>> resolve_address("10.0.0.5:8265")
    'http://10.0.0.5:8265'
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        raise ConfigError(
            "no cluster address: pass --address http://HEAD:8265 (the dashboard) or set RAY_ADDRESS"
        )
    if "://" not in address:
        address = f"http://{address}"
    return address.rstrip("/")


def find_token() -> tuple[str | None, str]:
    """(token, where it came from), in Ray's order; (None, reason) when there is none."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    path_env = os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if path_env:
        path = Path(path_env).expanduser()
        if not path.is_file() or not path.read_text(encoding="utf-8").strip():
            raise ConfigError(f"RAY_AUTH_TOKEN_PATH={path_env} is missing or empty")
        return path.read_text(encoding="utf-8").strip(), f"RAY_AUTH_TOKEN_PATH={path_env}"
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file() and default.read_text(encoding="utf-8").strip():
        return default.read_text(encoding="utf-8").strip(), str(default)
    return None, "no token found"


def _tree_size(root: Path) -> int:
    total = 0
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
        for name in files:
            with contextlib.suppress(OSError):
                total += (Path(folder) / name).stat().st_size
    return total


def _size_limit() -> int:
    try:
        from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

        return int(GCS_STORAGE_MAX_SIZE)
    except ImportError:  # moved in another Ray release: Ray's own default
        return 512 * 1024**2


@dataclass
class SubmitOptions:
    """What travels with a job besides its command line."""

    working_dir: str | None = "."
    pip: list[str] = field(default_factory=list)
    env_vars: dict[str, str] = field(default_factory=dict)
    num_cpus: float | None = None
    num_gpus: float | None = None
    submission_id: str | None = None
    python: str = "python"


def runtime_env(options: SubmitOptions) -> dict[str, Any]:
    """The job's runtime_env: working_dir (size-checked, excludes applied), pip, env_vars.

    >>> runtime_env(SubmitOptions(working_dir=None, env_vars={"HF_HUB_OFFLINE": "1"}))
    {'env_vars': {'HF_HUB_OFFLINE': '1'}}
    """
    env: dict[str, Any] = {}
    if options.working_dir is not None:
        root = Path(options.working_dir).expanduser().resolve()
        if not root.is_dir():
            raise ConfigError(f"--working-dir {options.working_dir} is not a folder")
        size, limit = _tree_size(root), _size_limit()
        if size >= limit:
            raise ConfigError(
                f"--working-dir {root} holds {size / 2**20:.0f} MiB after excludes, over Ray's "
                f"{limit / 2**20:.0f} MiB package limit; move data to shared storage, list it in "
                ".rayignore, or pass --image-only"
            )
        env["working_dir"] = str(root)
        env["excludes"] = list(DEFAULT_EXCLUDES)
    if options.pip:
        env["pip"] = list(options.pip)
    if options.env_vars:
        env["env_vars"] = dict(options.env_vars)
    return env


def _check_paths(args: list[str], working_dir: str | None) -> None:
    """A relative file argument must lie inside the working dir, or the cluster won't see it."""
    if working_dir is None:
        return
    root = Path(working_dir).expanduser().resolve()
    for arg in args:
        if arg.startswith("-") or os.path.isabs(arg) or not Path(arg).exists():
            continue
        if not Path(arg).resolve().is_relative_to(root):
            raise ConfigError(
                f"{arg} is outside --working-dir {root}; the job would not find it. "
                "Use a path inside it, or an absolute path that every node reaches"
            )


@contextlib.contextmanager
def _explicit_address() -> Iterator[None]:
    """Ray lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the address it is given;
    hide them while the client is built so `--address` wins (we already fell back to them)."""
    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


class JobsClient:
    """Submit, list, follow and stop tl-ray jobs on the cluster at `address`."""

    def __init__(self, address: str | None = None) -> None:
        self.address = resolve_address(address)
        self.token, self.token_source = find_token()
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        with self._errors(), _explicit_address():
            from ray.job_submission import JobSubmissionClient

            self._client = JobSubmissionClient(self.address, headers=headers)

    @contextlib.contextmanager
    def _errors(self, job: str | None = None) -> Iterator[None]:
        """Turn the SDK's exceptions into one-line JobErrors."""
        from ray.exceptions import AuthenticationError

        try:
            yield
        except AuthenticationError as error:
            if "401" in str(error) or "Missing" in str(error) or self.token is None:
                raise JobError(
                    f"the cluster at {self.address} requires a token and none was found: set "
                    f"{_TOKEN_SOURCES} (cluster/local.sh up prints the export line)"
                ) from None
            raise JobError(
                f"the cluster at {self.address} rejected the token from {self.token_source}; "
                "use the token of that cluster"
            ) from None
        except ConnectionError as error:
            raise JobError(
                f"cannot reach the Ray job server at {self.address} ({error}); is the cluster up, "
                "and is that its dashboard address (port 8265 by default)?"
            ) from None
        except RuntimeError as error:
            text = str(error)
            if job is not None and ("404" in text or "does not exist" in text):
                raise JobError(f"no job {job!r} on {self.address}; see `tl-ray jobs list`") from None
            raise JobError(text.splitlines()[0][:300]) from None

    def submit(self, args: list[str], options: SubmitOptions | None = None) -> str:
        """Submit `tl-ray ARGS...` as a job; returns its submission id."""
        options = options or SubmitOptions()
        if not args:
            raise ConfigError("nothing to run: give a tl-ray command after --, e.g. -- tune run.yaml ...")
        if args[0] in ("tl-ray", "tl_ray"):
            args = args[1:]
        _check_paths(args, options.working_dir)
        entrypoint = f"{options.python} -m tl_ray {shlex.join(args)}"
        with self._errors():
            return self._client.submit_job(
                entrypoint=entrypoint,
                runtime_env=runtime_env(options) or None,
                submission_id=options.submission_id,
                entrypoint_num_cpus=options.num_cpus,
                entrypoint_num_gpus=options.num_gpus,
            )

    def status(self, job: str) -> dict[str, Any]:
        """The job's status, message, entrypoint, start/end times."""
        with self._errors(job):
            info = self._client.get_job_info(job)
        return _info(info)

    def list(self) -> list[dict[str, Any]]:
        with self._errors():
            jobs = self._client.list_jobs()
        return [_info(info) for info in sorted(jobs, key=lambda j: j.start_time or 0)]

    def logs(self, job: str) -> str:
        with self._errors(job):
            return self._client.get_job_logs(job)

    def stop(self, job: str) -> bool:
        with self._errors(job):
            return self._client.stop_job(job)

    def follow(self, job: str, write: Callable[[str], None], *, timeout_s: float | None = None) -> dict[str, Any]:
        """Stream the job's logs to `write` until it ends; returns its final status."""

        async def tail() -> None:
            async for lines in self._client.tail_job_logs(job):
                write(lines)

        logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)
        with self._errors(job):
            self._client.get_job_info(job)  # a clear error for an unknown id
            asyncio.run(asyncio.wait_for(tail(), timeout_s) if timeout_s else tail())
        deadline = time.monotonic() + 30
        info = self.status(job)
        while info["status"] not in TERMINAL and time.monotonic() < deadline:
            time.sleep(0.5)  # the log stream closes a moment before the status flips
            info = self.status(job)
        return info


def _info(info: Any) -> dict[str, Any]:
    status = getattr(info.status, "value", str(info.status))
    return {
        "submission_id": info.submission_id,
        "status": status,
        "message": info.message,
        "entrypoint": info.entrypoint,
        "start_time": info.start_time,
        "end_time": info.end_time,
    }
