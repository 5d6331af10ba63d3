"""Ports for test servers, and for addresses where nothing listens.

A port the kernel hands out for ``bind(("127.0.0.1", 0))`` lies in the ephemeral range, the
same range it draws a client's source port from. A test that polls such a port before its
server listens can draw that very port as its source and connect to itself (TCP simultaneous
open): the poll then reads back its own request ("BadStatusLine: GET / HTTP/1.1", seen in CI).
Ports below the ephemeral range are never a source port, so a poll either reaches the server
or is refused.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_FLOOR = 20000


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def unused_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """A port on 127.0.0.1 that nothing is bound to now and that no client uses as its source."""
    top = _ephemeral_start() - 1
    candidates = random.sample(range(_FLOOR, top + 1), k=min(200, top + 1 - _FLOOR))
    for port in candidates:
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between {_FLOOR} and {top} on 127.0.0.1")
