"""Free TCP ports on 127.0.0.1 for the tests that start Ray heads of their own."""

from __future__ import annotations

import socket


def free_ports(n: int) -> list[int]:
    """n distinct free ports: every socket stays bound until all are taken, or the OS may
    hand the same port out twice (Ray refuses a head with two components on one)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
