"""The round trip to each live job peer (issue 11: each order shows its latest round-trip time),
reported to the gateway in a signed ROUND_TRIPS frame.

Why a ping and nothing the agent already has (docs/nat.md): WireGuard's UAPI gives a job peer's
last handshake but not when its initiation left, and forcing a handshake would drop the
tenant's session; the hub check (clawnode.connectivity) times the path to the gateway, not to
the buyer. An ICMP echo from the node's mesh address to the buyer's tunnel address crosses the
whole path the buyer's traffic takes (through a relay or not) and both WireGuard ends.

- Who: job peers of the applied desired state whose latest handshake is at most LIVE_FOR old
  (WireGuard's REJECT_AFTER_TIME: past it the session is gone). A peer with no live session has
  no buyer to answer: it is not pinged (a ping would only make WireGuard start a handshake
  toward a buyer who is not there) and not reported, so the gateway keeps the last value with
  its time and the order page shows how old it is.
- How: one round sends one echo request to every target from the mesh address, then waits at
  most TIMEOUT for all the replies (one socket, not one wait per peer: a hundred silent buyers
  cost two seconds, not two hundred). A target with no reply by then is "no answer" (a host
  that drops ICMP, Windows' default, or a path that is down).
- The firewall lets exactly those replies in (clawnode.firewall: an echo reply, conntrack
  established, to the mesh address); everything else a sandboxed peer sends to the host is
  still dropped.
- Cost to the buyer: the bytes cross the job peer and are metered to it: 2 x 64 bytes of
  ICMP plus WireGuard's 32 each way, about 0.2 kB a minute, 9 MB a month.

The socket sits behind the Pinger protocol, as the WireGuard backend does: unit tests use
FakePinger, the netns tier IcmpPinger across real tunnels (tests/netns/test_round_trip.py).
"""

from __future__ import annotations

import ipaddress
import os
import select
import socket
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import wire
from .backends.base import PeerStatus
from .keys import Identity
from .wire.messages import MAX_RTT_US

__all__ = [
    "INTERVAL",
    "LIVE_FOR",
    "TIMEOUT",
    "FakePinger",
    "IcmpPinger",
    "Pinger",
    "Target",
    "frame",
    "measure",
    "targets",
]

INTERVAL = 60.0  # seconds between two rounds (the daemon's Timing.rtt)
TIMEOUT = 2.0  # seconds a round waits for its replies
LIVE_FOR = 180  # seconds: WireGuard's REJECT_AFTER_TIME, a session older than it is gone
_ECHO_REQUEST, _ECHO_REPLY = 8, 0
_PAYLOAD = b"clawnode-rtt\0\0\0\0"  # 16 bytes; marks the agent's pings in a capture


class Pinger(Protocol):
    def ping_all(
        self, source: str, targets: Sequence[str], timeout: float
    ) -> dict[str, float | None]:
        """One echo to each address in ``targets`` from ``source``: its round trip in seconds,
        or None without a reply within ``timeout``. Every target is in the result."""
        ...


@dataclass(frozen=True)
class Target:
    public_key: str
    ref: str
    address: str  # the buyer's tunnel address


def targets(
    desired: wire.DesiredState | None, peers: Mapping[str, PeerStatus], now: float
) -> list[Target]:
    """The job peers of ``desired`` with a live session on the interface (``peers``: what the
    device reports), each with its tunnel address (the first /32 it routes)."""
    if desired is None:
        return []
    found = []
    for spec in desired.peers:
        status = peers.get(spec.public_key)
        if spec.kind != "job" or status is None or not status.last_handshake:
            continue
        if now - status.last_handshake > LIVE_FOR:
            continue
        hosts = [
            str(net.network_address)
            for net in map(ipaddress.IPv4Network, spec.allowed_ips)
            if net.prefixlen == 32
        ]
        if hosts:
            found.append(Target(spec.public_key, spec.ref, hosts[0]))
    return found


def measure(
    pinger: Pinger, source: str, found: Sequence[Target], timeout: float = TIMEOUT
) -> list[wire.RoundTrip]:
    """One round: each target's round trip (microseconds, at least 1) or no answer."""
    if not found:
        return []
    answers = pinger.ping_all(source, sorted({t.address for t in found}), timeout)
    results = []
    for target in found:
        seconds = answers.get(target.address)
        if seconds is None:
            results.append(wire.RoundTrip(target.public_key, target.ref, answered=False))
        else:
            us = min(MAX_RTT_US, max(1, round(seconds * 1_000_000)))
            results.append(wire.RoundTrip(target.public_key, target.ref, True, us))
    return results


def frame(
    identity: Identity, results: Sequence[wire.RoundTrip], *, now: int | None = None
) -> dict[str, Any]:
    """The signed ROUND_TRIPS frame of one round."""
    body = wire.RoundTrips(
        node_id=identity.node_id,
        measured_at=int(time.time()) if now is None else now,
        peers=tuple(results),
    ).to_dict()
    return {
        "type": "round_trips",
        "envelope": wire.signed_envelope(wire.ROUND_TRIPS, body, identity),
    }


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def echo_request(ident: int, seq: int) -> bytes:
    header = struct.pack("!BBHHH", _ECHO_REQUEST, 0, 0, ident, seq)
    checksum = _checksum(header + _PAYLOAD)
    return struct.pack("!BBHHH", _ECHO_REQUEST, 0, checksum, ident, seq) + _PAYLOAD


def parse_reply(packet: bytes) -> tuple[str, int, int] | None:
    """(source, ident, seq) of an IPv4 packet carrying an ICMP echo reply, else None."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    start = (packet[0] & 0x0F) * 4
    if len(packet) < start + 8 or packet[9] != socket.IPPROTO_ICMP:
        return None
    kind, _code, _sum, ident, seq = struct.unpack("!BBHHH", packet[start : start + 8])
    if kind != _ECHO_REPLY:
        return None
    return socket.inet_ntoa(packet[12:16]), ident, seq


class IcmpPinger:
    """Echo requests through a raw ICMP socket bound to the mesh address (the agent runs as
    root, as it must for WireGuard and nftables; a datagram ICMP socket would need the host's
    ping_group_range, which a network namespace resets to nobody). A raw socket receives every
    ICMP packet to its address: replies are matched by this round's identifier, their
    sequence number and their source."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock

    def ping_all(
        self, source: str, targets: Sequence[str], timeout: float
    ) -> dict[str, float | None]:
        results: dict[str, float | None] = {address: None for address in targets}
        if not targets:
            return results
        ident = int.from_bytes(os.urandom(2), "big")
        sent: dict[int, tuple[str, float]] = {}
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
            sock.bind((source, 0))
            sock.setblocking(False)
            for seq, address in enumerate(targets, start=1):
                try:
                    sock.sendto(echo_request(ident, seq), (address, 0))
                except OSError:
                    continue  # no route, no endpoint yet: no answer
                sent[seq] = (address, self.clock())
            deadline = self.clock() + timeout
            while sent:
                left = deadline - self.clock()
                if left <= 0:
                    break
                readable, _, _ = select.select([sock], [], [], left)
                if not readable:
                    break
                try:
                    packet = sock.recv(65535)
                except OSError:
                    continue
                arrived = self.clock()
                reply = parse_reply(packet)
                if reply is None or reply[1] != ident or reply[2] not in sent:
                    continue
                address, at = sent[reply[2]]
                if reply[0] != address:
                    continue
                del sent[reply[2]]
                results[address] = arrived - at
        return results


@dataclass
class FakePinger:
    """Test double: ``answers`` maps an address to its round trip in seconds (missing or None:
    no answer); every round is kept in ``rounds`` as (source, targets, timeout)."""

    answers: dict[str, float | None] = field(default_factory=dict)
    rounds: list[tuple[str, tuple[str, ...], float]] = field(default_factory=list)

    def ping_all(
        self, source: str, targets: Sequence[str], timeout: float
    ) -> dict[str, float | None]:
        self.rounds.append((source, tuple(targets), timeout))
        return {address: self.answers.get(address) for address in targets}
