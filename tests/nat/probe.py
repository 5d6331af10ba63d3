"""UDP probes the NAT lab runs inside its namespaces (standard library only; one JSON line out).

observer ADDR... : a STUN-like observer bound to ports 3478 and 3479 of each address. "probe"
    is answered with the source it came from ("ip:port"); "spray" makes it send, to that source,
    unsolicited packets from its other port ("port") and from its other address ("addr"), then
    the answer from the socket the client contacted ("same"), which the client waits for.
classify A B : from one local port, probe A:3478 and ask it to spray (filtering); from another,
    probe A:3478, A:3479 and B:3478 (mapping). Prints what it saw.
stun PORT A : from local PORT, probe A:3478; prints the mapping it observed.
punch PORT PEER : from local PORT, send to PEER ("ip:port") every 50 ms until something
    arrives (or 5 s pass); prints where the first packet came from.
"""

from __future__ import annotations

import json
import selectors
import socket
import sys
import time

PORTS = (3478, 3479)
# Every probe runs inside a namespace of the lab, whose only links are the lab's own.
ANYWHERE = "0.0.0.0"  # noqa: S104


def observer(addresses: list[str]) -> None:
    sockets = {}
    for address in addresses:
        for port in PORTS:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((address, port))
            sockets[(address, port)] = sock
    selector = selectors.DefaultSelector()
    for key, sock in sockets.items():
        selector.register(sock, selectors.EVENT_READ, key)
    print("ready", flush=True)
    while True:
        for event, _ in selector.select():
            (address, port), sock = event.data, event.fileobj
            data, source = sock.recvfrom(2048)
            if data == b"probe":
                sock.sendto(f"{source[0]}:{source[1]}".encode(), source)
            elif data == b"spray":
                other_port = next(p for p in PORTS if p != port)
                other_address = next(a for a in addresses if a != address)
                sockets[(address, other_port)].sendto(b"port", source)
                sockets[(other_address, port)].sendto(b"addr", source)
                sock.sendto(b"same", source)


def _ask(sock: socket.socket, message: bytes, target: tuple[str, int]) -> str:
    """Send until an answer comes (the first packet may be lost while a NAT sets up)."""
    sock.settimeout(0.5)
    for _ in range(10):
        sock.sendto(message, target)
        try:
            data, _ = sock.recvfrom(2048)
        except TimeoutError:
            continue
        return data.decode()
    raise SystemExit(f"no answer from {target[0]}:{target[1]} to {message!r}")


def classify(a: str, b: str) -> None:
    filtering = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    filtering.bind((ANYWHERE, 0))
    first = _ask(filtering, b"probe", (a, PORTS[0]))
    filtering.sendto(b"spray", (a, PORTS[0]))
    received: list[str] = []
    filtering.settimeout(2)
    # "same" comes last from the observer over the same path; after it, a short grace period
    # catches an unsolicited packet that was reordered behind it.
    deadline = None
    while deadline is None or time.monotonic() < deadline:
        try:
            data, _ = filtering.recvfrom(2048)
        except TimeoutError:
            break
        received.append(data.decode())
        if data == b"same" and deadline is None:
            deadline = time.monotonic() + 0.3
            filtering.settimeout(0.3)
    mapping = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    mapping.bind((ANYWHERE, 0))
    observed = {
        "a": _ask(mapping, b"probe", (a, PORTS[0])),
        "a_other_port": _ask(mapping, b"probe", (a, PORTS[1])),
        "b": _ask(mapping, b"probe", (b, PORTS[0])),
    }
    print(json.dumps({"first": first, "received": sorted(set(received)), "mapping": observed}))


def stun(port: int, a: str) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((ANYWHERE, port))
    print(json.dumps({"mapping": _ask(sock, b"probe", (a, PORTS[0]))}), flush=True)


def punch(port: int, peer: str) -> None:
    host, _, peer_port = peer.rpartition(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((ANYWHERE, port))
    sock.settimeout(0.05)
    heard = None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        sock.sendto(b"punch", (host, int(peer_port)))
        try:
            _, source = sock.recvfrom(2048)
        except TimeoutError:
            continue
        heard = f"{source[0]}:{source[1]}"
        # Keep sending a little so the other side hears us too, whoever heard first.
        for _ in range(10):
            sock.sendto(b"punch", (host, int(peer_port)))
            time.sleep(0.05)
        break
    print(json.dumps({"heard_from": heard}), flush=True)


def main() -> None:
    mode, *args = sys.argv[1:]
    if mode == "observer":
        observer(args)
    elif mode == "classify":
        classify(*args)
    elif mode == "stun":
        stun(int(args[0]), args[1])
    elif mode == "punch":
        punch(int(args[0]), args[1])
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
