"""Network helpers."""

from __future__ import annotations

import socket

__all__ = ["free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it).

    >>> 0 < free_port() < 65536
    True
    """
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]
