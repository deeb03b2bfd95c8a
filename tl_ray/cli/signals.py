"""Stop signals and full disks, handled the same way by the long-running commands.

`kill`, systemd and Kubernetes stop a process with SIGTERM; a terminal's Ctrl-C sends SIGINT.
Ray Tune and Ray Train stop gracefully on SIGINT only (Tune saves its experiment state and
ends its trials, Train aborts its controller and workers), and Python's default SIGTERM just
ends the process, leaving trials and worker actors to die with Ray. `sigterm_as_sigint()` makes
SIGTERM do exactly what SIGINT does at that moment (call the SIGINT handler Ray installed, or
raise KeyboardInterrupt), so `tl-ray tune` and `tl-ray train` stop the same way on either, and
a search stopped by either is continued with `tl-ray tune --resume DIR`.

`disk_full(error)` finds an ENOSPC / EDQUOT / EFBIG anywhere in an error's chain, including the
errors Ray Train brings back from its workers, so the CLI can say it in one line.

Example:
    >>> with sigterm_as_sigint():  # doctest: +SKIP
    ...     tuner.fit()
    >>> received()               # doctest: +SKIP
    [<Signals.SIGTERM: 15>]
"""

from __future__ import annotations

import contextlib
import errno
import logging
import signal
import sys
import threading
from typing import Any, Iterator

__all__ = ["EXIT_CODES", "disk_full", "quiet_disk_errors", "received", "sigterm_as_sigint"]

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal, as shells report it
_received: list[int] = []
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_FULL_TEXT = ("no space left on device", "disk quota exceeded", "file too large")


def _as_sigint(signum: int, frame: Any) -> None:
    _received.append(signum)
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and handler is not _as_sigint:
        handler(signal.SIGINT, frame)  # Tune's / Train's graceful stop, or KeyboardInterrupt
    else:
        raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_sigint() -> Iterator[None]:
    """Within the block, SIGTERM behaves as SIGINT does when it arrives (main thread only:
    elsewhere signals cannot be handled, and nothing changes). The old handler comes back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _as_sigint)
    hooks = _ray_post_init_hooks()
    hooks.append(_reinstall)  # ray.init puts its own SIGTERM handler in: put ours back after it
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            hooks.remove(_reinstall)
        signal.signal(signal.SIGTERM, previous)


def _reinstall() -> None:
    """After `ray.init`: its core worker installs a C-level handler for SIGTERM in the driver
    (it prints a stack and aborts the process, exit -6), which replaces ours."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _as_sigint)


def _ray_post_init_hooks() -> list:
    """Ray's list of callables run at the end of every `ray.init` (a plain list where Ray moved it)."""
    try:
        from ray._private import worker
    except ImportError:
        return []
    hooks = getattr(worker, "_post_init_hooks", None)
    return hooks if isinstance(hooks, list) else []


def received() -> list[int]:
    """The stop signals turned into SIGINT so far (SIGTERM), in order."""
    return list(_received)


def _chain(error: BaseException):
    """`error`, its causes and contexts, and what Ray attached (worker failures, `cause`)."""
    seen, todo = set(), [error]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__, getattr(current, "cause", None)]
        failures = getattr(current, "worker_failures", None)
        if isinstance(failures, dict):
            todo += [f for f in failures.values() if isinstance(f, BaseException)]


def disk_full(error: BaseException) -> bool:
    """Whether `error` comes from a full disk (or quota, or RLIMIT_FSIZE).

    A worker's OSError reaches the driver inside Ray's errors, sometimes only as its text.

    >>> disk_full(OSError(28, "No space left on device")), disk_full(ValueError("x"))
    (True, False)
    """
    for link in _chain(error):
        if isinstance(link, OSError) and link.errno in _FULL:
            return True
        if type(link).__module__.startswith("ray") and any(t in str(link).lower() for t in _FULL_TEXT):
            return True
    return False


def quiet_disk_errors() -> None:
    """A full disk also breaks log handlers and TensorBoard's exit-time flush: let those fail
    without printing tracebacks (the command reports the full disk itself, in one line)."""
    logging.raiseExceptions = False
    default = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        value = unraisable.exc_value
        if isinstance(value, OSError) and value.errno in _FULL:
            return
        default(unraisable)

    sys.unraisablehook = hook
