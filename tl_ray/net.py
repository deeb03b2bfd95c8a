"""Network helpers (stdlib only: cluster/local_cluster.py loads this file by path)."""

from __future__ import annotations

import socket

__all__ = ["free_port", "free_ports"]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct TCP ports nothing listens on right now (the OS picks them; all are
    held open together, so none repeats).

    >>> ports = free_ports(3)
    >>> len(set(ports)) == 3 and all(0 < p < 65536 for p in ports)
    True
    """
    probes = []
    try:
        for _ in range(count):
            probe = socket.socket()
            probes.append(probe)
            probe.bind((host, 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now.

    >>> 0 < free_port() < 65536
    True
    """
    return free_ports(1, host)[0]
