"""The node's check of its paths over the mesh, reported to the gateway (the seed's registration
steps 4-6: after joining, the node tests its tunnels and says what it found).

The hub: the gateway's hub (meshnet.hub) is a peer of every node, carried in the signed desired
state (kind "mesh", ref "hub", allowed 10.100.0.1/32, keepalive). It carries no traffic (on the
hub's side the node has no allowed IP), so the test cannot be a ping: it is a WireGuard
handshake, which needs no allowed IP. The check sets the hub peer afresh on the interface
(removed, then set again exactly as the desired state has it: the hub meters nothing and routes
nothing, so nothing is lost), which makes WireGuard send a handshake initiation at once (the
keepalive), and polls the peer until its latest handshake appears. The time from the set to the
handshake is one round trip to the hub plus two Noise operations: the hub's RTT as the mesh
sees it, to the poll interval (10 ms). No handshake within HANDSHAKE_TIMEOUT (WireGuard's own
REKEY_TIMEOUT, after which it would send a second initiation) is "unreachable".

A peer node: node-to-node peers are job-scoped (added when a multi-node job starts on both
nodes) and not built yet, so there is no tunnel to a peer node to test; a probe of its public
endpoint without WireGuard proves nothing (WireGuard answers no unauthenticated packet). The
check reports the peer "untested" and says so, until mesh peers exist (docs/provider.md).

Pure except for the backend it is given (the agent's WireGuard backend, or a test double).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import wire
from .backends.base import WireGuardBackend
from .backends.errors import WireGuardError
from .keys import Identity

__all__ = ["HUB_REF", "Probe", "Result", "check", "finish", "frame", "hub_peer", "start"]

HUB_REF = "hub"  # meshnet.hub.HUB_REF: the hub peer's ref in a desired state
HANDSHAKE_TIMEOUT = 5.0  # seconds; WireGuard's REKEY_TIMEOUT
POLL_INTERVAL = 0.01
INITIATION_GAP = 0.05  # seconds between two initiations to the hub (see start)
PEER_PENDING = "no peer node to test: node-to-node mesh peers are not built yet"
NO_HUB = "the gateway runs no hub (its desired state carries none)"


@dataclass(frozen=True)
class Result:
    hub: str  # one of wire.PATH_STATES
    hub_rtt_ms: int = 0
    detail: str = ""


def hub_peer(desired: wire.DesiredState | None) -> wire.PeerSpec | None:
    """The hub as the desired state carries it, None without one."""
    if desired is None:
        return None
    for peer in desired.peers:
        if peer.kind == "mesh" and peer.ref == HUB_REF:
            return peer
    return None


@dataclass(frozen=True)
class Probe:
    """A handshake under way: the hub peer was set afresh at ``started`` (``clock`` time)."""

    spec: wire.PeerSpec
    started: float


def start(
    backend: WireGuardBackend,
    desired: wire.DesiredState | None,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Probe | Result:
    """Set the hub peer afresh (removed, then set as the desired state has it), which starts a
    handshake; a Result at once when there is no hub or the device refuses. Hold the agent's
    reconcile lock around it (it changes a peer); ``finish`` needs no lock."""
    spec = hub_peer(desired)
    if spec is None:
        return Result(hub="untested", detail=NO_HUB)
    key = spec.public_key
    try:
        if backend.read_peers([key]):
            backend.remove_peer(key)
            # The hub drops an initiation that follows the last one it took from this peer
            # within 20 ms (WireGuard's flood limit; its timestamps are also coarsened to about
            # 16 ms, and an equal one reads as a replay). The first check comes right after the
            # first desired state set the hub peer, whose own initiation is that last one: sent
            # at once, the probe's would be dropped and nothing retried for REKEY_TIMEOUT.
            sleep(INITIATION_GAP)
        started = clock()
        backend.set_peer(key, spec.allowed_ips, spec.endpoint, spec.persistent_keepalive)
    except WireGuardError as exc:
        return Result(hub="unreachable", detail=f"WireGuard error: {exc}"[:300])
    return Probe(spec=spec, started=started)


def finish(
    backend: WireGuardBackend,
    probe: Probe | Result,
    *,
    timeout: float = HANDSHAKE_TIMEOUT,
    interval: float = POLL_INTERVAL,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Result:
    """Poll the hub peer until its handshake completes (reachable, with the time it took) or
    ``timeout`` passes (unreachable). Blocking: run it off the event loop."""
    if isinstance(probe, Result):
        return probe
    key = probe.spec.public_key
    try:
        while True:
            status = backend.read_peers([key]).get(key)
            elapsed = clock() - probe.started
            if status is not None and status.last_handshake:
                return Result(hub="reachable", hub_rtt_ms=max(1, round(elapsed * 1000)))
            if elapsed >= timeout:
                return Result(
                    hub="unreachable",
                    detail=f"no WireGuard handshake with the hub at {probe.spec.endpoint} "
                    f"in {timeout:g} s",
                )
            sleep(interval)
    except WireGuardError as exc:
        return Result(hub="unreachable", detail=f"WireGuard error: {exc}"[:300])


def check(backend: WireGuardBackend, desired: wire.DesiredState | None, **kwargs: Any) -> Result:
    """start then finish, for a caller that holds no lock (tests, a one-shot command)."""
    clock = kwargs.get("clock", time.monotonic)
    return finish(backend, start(backend, desired, clock=clock), **kwargs)


def frame(identity: Identity, result: Result, *, now: int | None = None) -> dict[str, Any]:
    """The signed CONNECTIVITY frame of one check."""
    body = wire.Connectivity(
        node_id=identity.node_id,
        checked_at=int(time.time()) if now is None else now,
        hub=result.hub,
        hub_rtt_ms=result.hub_rtt_ms,
        peer="untested",
        detail="; ".join(part for part in (result.detail, PEER_PENDING) if part)[:300],
    ).to_dict()
    return {
        "type": "connectivity",
        "envelope": wire.signed_envelope(wire.CONNECTIVITY, body, identity),
    }
