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
import functools
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
    "JobServerError",
    "JobsClient",
    "SubmitOptions",
    "Submission",
    "prepare_submission",
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


class JobServerError(RuntimeError):
    """The job server answered a request with an HTTP error; `status` is its status code.

    A RuntimeError, as the SDK's own error for it is, so code catching that still works.
    """

    def __init__(self, status: int, body: str) -> None:
        self.status, self.detail = status, " ".join(body.split())[:300]
        super().__init__(f"Request failed with status code {status}: {self.detail}")


@functools.cache
def _status_client_class() -> type:
    """Ray's JobSubmissionClient, with the HTTP status kept on the errors it raises.

    The SDK raises `AuthenticationError` for a 401 or 403 with only a message (no status
    attribute), and a bare RuntimeError("Request failed with status code N: BODY") for other
    HTTP errors. This subclass records each response's status (a `requests` response hook;
    `_do_request` passes extra keyword arguments on to `requests.request`), sets it as
    `status` on the AuthenticationError, and raises JobServerError(status, body) instead of
    the bare RuntimeError.
    """
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    class StatusJobSubmissionClient(JobSubmissionClient):
        def _do_request(self, method: str, endpoint: str, **kwargs: Any):
            seen: list[int] = []
            hooks = dict(kwargs.pop("hooks", None) or {})
            given = hooks.get("response") or []
            hooks["response"] = [*(given if isinstance(given, list) else [given]),
                                 lambda response, *a, **k: seen.append(response.status_code)]  # fmt: skip
            try:
                return super()._do_request(method, endpoint, hooks=hooks, **kwargs)
            except AuthenticationError as error:
                error.status = seen[-1] if seen else None
                raise

        def _raise_error(self, r: Any):
            raise JobServerError(r.status_code, r.text)

    return StatusJobSubmissionClient


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


class _Escape(Exception):
    """A symlink in the working dir that leads out of it (or back into itself)."""


def _check_link(path: Path, root: Path) -> None:
    if not path.is_symlink() or not path.exists():  # a dangling link is not packed
        return
    target = path.resolve()
    if not target.is_relative_to(root):
        raise _Escape(f"{path} is a symlink to {target}, outside it")
    if target.is_dir() and path.parent.resolve().is_relative_to(target):
        raise _Escape(f"{path} is a symlink to {target}, a folder that holds it (a loop)")


def _shipped_size(root: Path, excludes: list[str]) -> int:
    """Bytes Ray's packaging would upload from `root`, walking it the way Ray does (its
    `_dir_travel`: .gitignore, .rayignore and `excludes` applied, symlinks followed).

    Ray follows symlinks, so a link to a file or folder outside `root` would ship what it
    points to (a key, a home folder): such a link, and a link looping back to a folder above
    it, raise _Escape. Links whose targets stay inside `root` are fine.
    """
    quiet = logging.getLogger("tl_ray.jobs.packaging")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    total = 0

    def visit(path: Path) -> None:
        nonlocal total
        _check_link(path, root)
        if path.is_file():
            with contextlib.suppress(OSError):
                total += path.stat().st_size

    try:
        from ray._private.runtime_env import packaging
    except ImportError:  # moved in another Ray release: the same check over a plain walk
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
            for name in dirs + files:
                visit(Path(folder) / name)
        return total
    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"  # as Ray reads it
    packaging._dir_travel(root, [packaging._get_excludes(root, excludes)], visit,
                          include_gitignore=include_gitignore, logger=quiet)  # fmt: skip
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
        try:
            size = _shipped_size(root, DEFAULT_EXCLUDES)
        except _Escape as escape:
            raise ConfigError(
                f"--working-dir {root}: {escape}; Ray would upload what it points to. Copy what "
                "the job needs into the folder, list the link in .rayignore, or pass --image-only"
            ) from None
        limit = _size_limit()
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


@dataclass(frozen=True)
class Submission:
    """A job checked on this machine and ready to send: what `JobsClient.submit` sends."""

    entrypoint: str
    runtime_env: dict[str, Any]
    options: SubmitOptions


def prepare_submission(args: list[str], options: SubmitOptions | None = None) -> Submission:
    """Check `tl-ray ARGS...` and what would be shipped with it, before any cluster is asked.

    >>> prepare_submission(["train", "x.yaml"], SubmitOptions(working_dir=None)).entrypoint
    'python -m tl_ray train x.yaml'
    """
    options = options or SubmitOptions()
    if not args:
        raise ConfigError("nothing to run: give a tl-ray command after --, e.g. -- tune run.yaml ...")
    if args[0] in ("tl-ray", "tl_ray"):
        args = args[1:]
    _check_paths(args, options.working_dir)
    entrypoint = f"{options.python} -m tl_ray {shlex.join(args)}"
    return Submission(entrypoint, runtime_env(options), options)


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
            self._client = _status_client_class()(self.address, headers=headers)

    @contextlib.contextmanager
    def _errors(self, job: str | None = None) -> Iterator[None]:
        """Turn the SDK's exceptions into one-line JobErrors, by the HTTP status they carry
        (`_status_client_class`), never by what their text happens to contain."""
        import requests
        from ray.exceptions import AuthenticationError

        try:
            yield
        except AuthenticationError as error:
            status = getattr(error, "status", None)
            if self.token is None:
                raise JobError(
                    f"the cluster at {self.address} requires a token and none was found: set "
                    f"{_TOKEN_SOURCES} (cluster/local.sh up prints the export line)"
                ) from None
            if status == 401:  # a token was sent, but not as a credential the server reads
                raise JobError(
                    f"the cluster at {self.address} did not accept the token from "
                    f"{self.token_source} as credentials (HTTP 401); is that file a Ray auth token?"
                ) from None
            raise JobError(
                f"the cluster at {self.address} rejected the token from {self.token_source}; "
                "use the token of that cluster"
            ) from None
        except JobServerError as error:
            if job is not None and error.status == 404:
                raise JobError(f"no job {job!r} on {self.address}; see `tl-ray jobs list`") from None
            raise JobError(f"the job server at {self.address} answered HTTP {error.status}: {error.detail}") from None
        except requests.HTTPError as error:  # the SDK's version check raises these as they are
            status = getattr(error.response, "status_code", None)
            raise JobError(f"the job server at {self.address} answered HTTP {status} to {error.request.url}") from None
        except ConnectionError as error:
            raise JobError(
                f"cannot reach the Ray job server at {self.address} ({error}); is the cluster up, "
                "and is that its dashboard address (port 8265 by default)?"
            ) from None
        except RuntimeError as error:  # the SDK's other failures (a log stream cut short, ...)
            raise JobError(str(error).splitlines()[0][:300]) from None

    def submit(self, args: list[str] | Submission, options: SubmitOptions | None = None) -> str:
        """Submit `tl-ray ARGS...` (or a `prepare_submission` result) as a job; its submission id."""
        job = args if isinstance(args, Submission) else prepare_submission(args, options)
        with self._errors():
            return self._client.submit_job(
                entrypoint=job.entrypoint,
                runtime_env=job.runtime_env or None,
                submission_id=job.options.submission_id,
                entrypoint_num_cpus=job.options.num_cpus,
                entrypoint_num_gpus=job.options.num_gpus,
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
