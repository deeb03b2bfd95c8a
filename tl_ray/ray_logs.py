"""Ray's own output off the terminal: into a log file in the experiment folder.

The `tl-ray` commands call `quiet(verbose)` once. From then on:
- the lines Ray forwards from its workers and actors (Train controller and workers, Ray Data,
  trial processes, Serve replicas) and the driver's `ray.*` loggers go to `OUTPUT/ray.log`
  once a command names its folder with `log_to` (kept in memory, bounded, until then);
- Python warnings from libraries go there too;
- with `verbose`, everything is also shown live, as Ray prints it.
Ray's own per-process logs stay in Ray's session folder (`/tmp/ray/session_latest/logs`).
Used as a library (no `quiet` call), Ray prints as it always does.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["LOG_NAME", "attach", "log_to", "quiet"]

LOG_NAME = "ray.log"
_HANDLER = "tl_ray_logs"
_lock = threading.Lock()
_state: dict[str, Any] = {"on": False, "verbose": False, "file": None, "path": None,
                          "pending": collections.deque(maxlen=5000)}  # fmt: skip


def _write(line: str) -> None:
    with _lock:
        handle = _state["file"]
        if handle is None:
            _state["pending"].append(line)
            return
        handle.write(line + "\n")
        handle.flush()


class _FileHandler(logging.Handler):
    """A logging handler that writes into the same file as the forwarded worker lines."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _write(self.format(record))
        except Exception:  # never let logging break the command
            self.handleError(record)


def _on_batch(data: dict[str, Any]) -> None:
    """One batch of lines Ray forwarded from a worker process (its stdout or stderr)."""
    who = data.get("actor_name") or data.get("task_name") or ""
    pid = data.get("pid")
    prefix = f"({who} pid={pid}, ip={data.get('ip')})" if pid not in ("autoscaler", "raylet") else f"({pid})"
    for line in data.get("lines", []):
        _write(f"{prefix} {line}")
    if _state["verbose"]:
        from ray._private.worker import print_to_stdstream

        print_to_stdstream(data, ignore_prefix=False)


class _TerminalFormatter(logging.Formatter):
    """tl-ray's own log lines: the message, with `warning:` / `error:` in front when not INFO."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if not record.name.startswith("tl_ray"):  # --verbose: a library's line, say whose
            return f"{record.levelname} {record.name}: {text}"
        return text if record.levelno <= logging.INFO else f"{record.levelname.lower()}: {text}"


def quiet(verbose: bool = False) -> None:
    """tl-ray's log lines to the terminal; Ray's and other libraries' to the log file (and
    with `verbose` to the terminal as well). Cheap: Ray itself is hooked by `attach`."""
    _state.update(on=True, verbose=verbose)
    terminal = logging.StreamHandler(sys.stderr)
    terminal.setFormatter(_TerminalFormatter())
    if not verbose:
        terminal.addFilter(lambda record: record.name.startswith("tl_ray"))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "tl_ray", False)]:  # an earlier call's
        root.removeHandler(old)
    for handler in (terminal, _file_handler()):
        handler.tl_ray = True
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # library warnings: the log file (and the terminal if verbose)


def _file_handler() -> logging.Handler:
    handler = _FileHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler


def attach() -> None:
    """Hook Ray: its driver-side loggers (before `ray.init`) and the lines it forwards from
    workers (after). Idempotent; `ensure_ray` calls it on both sides of `ray.init`."""
    if not _state["on"]:
        return
    import ray  # noqa: F401  (sets up the "ray" logger and its own terminal handler first)
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    logger = logging.getLogger("ray")
    if not any(isinstance(h, _FileHandler) for h in logger.handlers):
        logger.handlers = ([] if not _state["verbose"] else logger.handlers) + [_file_handler()]
    names = [name for name, _ in dispatcher.handlers]
    if "ray_print_logs" in names or _HANDLER not in names:
        dispatcher.remove_handler("ray_print_logs")  # Ray's printer to this terminal
        dispatcher.remove_handler(_HANDLER)
        dispatcher.add_handler(_HANDLER, _on_batch)


def log_to(folder: str | Path) -> Path | None:
    """Write Ray's output to FOLDER/ray.log from now on (with what came before it)."""
    if not _state["on"]:
        return None
    path = Path(folder) / LOG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with _lock:
        if _state["path"] == path:
            return path
        if _state["file"] is not None:
            _state["file"].close()
        handle = open(path, "a", encoding="utf-8")
        handle.write(f"--- tl-ray {' '.join(sys.argv[1:])} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        while _state["pending"]:
            handle.write(_state["pending"].popleft() + "\n")
        handle.flush()
        _state.update(file=handle, path=path)
    return path
