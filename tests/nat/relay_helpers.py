"""Helpers the relay tests run inside the lab's namespaces (standard library only).

capture IFACE LOW-HIGH : every UDP packet on IFACE to or from a port in LOW-HIGH (the relay's),
    in and out, until SIGTERM; then one JSON line: packets per WireGuard message type, packets
    that are no WireGuard message (by the protocol's own sizes, parsed here, not by the
    relay's code), and packets carrying the tests' plaintext marker.
sink ADDR PORT : accept one TCP connection, count the bytes until EOF; one JSON line.
source ADDR PORT N : send N bytes of the marker pattern; one JSON line with the seconds taken.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import sys
import time

MARKER = b"MOLT-PLAINTEXT-MARKER-"
ETH_P_ALL = 0x0003
SOL_PACKET, PACKET_VNET_HDR, VNET_HDR_SIZE = 263, 15, 10
SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; Python does not name it
# Transport data is padded to 16 bytes but never past the MTU: a full-size one is not a
# multiple of 16.
SIZES = {1: lambda n: n == 148, 2: lambda n: n == 92, 3: lambda n: n == 64,
         4: lambda n: n >= 32}  # fmt: skip


def capture(iface: str, ports: str) -> None:
    low, high = (int(x) for x in ports.split("-"))
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    # SO_RCVBUF is capped at net.core.rmem_max (about 200 KB by default), which a loaded
    # machine's burst of 8 MB overran (CI saw the capture count 7 of 16 MB); the capture runs
    # as root, and SO_RCVBUFFORCE is not capped.
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 * 1024 * 1024)
    # wireguard-go sends with UDP GSO: one frame on the veth holds several datagrams of
    # gso_size bytes each. The virtio-net header in front of each frame says so.
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    sock.bind((iface, 0))
    sock.settimeout(0.2)
    counts = {"1": 0, "2": 0, "3": 0, "4": 0, "not_wireguard": 0, "marker": 0, "bytes": 0}
    stop = []
    samples: list[str] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    print("ready", flush=True)
    while not stop:
        try:
            frame = sock.recv(1 << 17)
        except TimeoutError:
            continue
        except InterruptedError:
            continue
        gso_type, gso_size = frame[1], struct.unpack_from("<H", frame, 4)[0]
        frame = frame[VNET_HDR_SIZE:]
        if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
            continue
        ihl = (frame[14] & 0x0F) * 4
        sport, dport = struct.unpack_from("!HH", frame, 14 + ihl)
        if not (low <= sport <= high or low <= dport <= high):
            continue
        payload = frame[14 + ihl + 8 :]
        counts["bytes"] += len(payload)
        if MARKER in payload:
            counts["marker"] += 1
        step = gso_size if gso_type and gso_size else len(payload)
        for at in range(0, len(payload), max(step, 1)):
            datagram = payload[at : at + step]
            kind = datagram[0] if datagram else 0
            if datagram[1:4] == b"\0\0\0" and kind in SIZES and SIZES[kind](len(datagram)):
                counts[str(kind)] += 1
            else:
                counts["not_wireguard"] += 1
                if len(samples) < 3:
                    samples.append(
                        f"{len(datagram)} bytes of {len(payload)}, gso {gso_type}/{gso_size}: "
                        f"{datagram[:8].hex()}"
                    )
    print(json.dumps({**counts, "samples": samples}), flush=True)


def sink(address: str, port: str) -> None:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((address, int(port)))
    server.listen(1)
    print("ready", flush=True)
    conn, _ = server.accept()
    total = 0
    while chunk := conn.recv(1 << 16):
        total += len(chunk)
    print(json.dumps({"received": total}), flush=True)


def source(address: str, port: str, size: str) -> None:
    n = int(size)
    block = (MARKER * (65536 // len(MARKER) + 1))[:65536]
    conn = socket.create_connection((address, int(port)), timeout=30)
    started = time.monotonic()
    sent = 0
    while sent < n:
        sent += conn.send(block[: min(len(block), n - sent)])
    conn.shutdown(socket.SHUT_WR)
    conn.recv(1)  # the sink closes after counting
    print(json.dumps({"sent": sent, "seconds": time.monotonic() - started}), flush=True)


if __name__ == "__main__":
    {"capture": capture, "sink": sink, "source": source}[sys.argv[1]](*sys.argv[2:])
