"""Which node of a node-to-node pair starts sending first (docs/nat.md, "The order of the sends").

Both nodes of a multi-node order get each other as a peer, endpoint and keepalive included, in
the same push (meshnet.mesh), and wireguard-go sends a handshake initiation the moment a peer's
keepalive is turned on toward an endpoint. Two initiations that cross can leave one side sending
with a key the other does not hold, while each side's keepalives keep the other's timers content,
so nothing re-handshakes for up to 120 s (wireguard-go's ConsumeMessageResponse and
ConsumeMessageInitiation race; reproduced in about 1 of 60 simultaneous starts, never in 200 with
one side 0.3 s later). So exactly one side starts first:

- the node whose node id sorts first sends at once, as before;
- the other adds the peer at once too (its allowed IPs: the first side's initiation is answered,
  WireGuard learning the endpoint from it), but gives it its endpoint and keepalive only
  ``stagger`` later, and then only what cannot initiate again if a handshake came meanwhile: the
  endpoint of a peer with a recent handshake is never moved (reconcile.plan), and a keepalive
  turned on then goes over the session.

Both nodes decide from what their desired states already carry (this node's id, the peer's ref
"node:<its id>"), so no field is added to the wire (an agent that predates this still parses
every state) and no round trip is needed. A pair with one agent that predates this is as before:
only the updated side waits, which still orders the sends whenever it is the second. The gateway
cannot tell yet which node's NAT would rather go first (docs/nat.md), so the tie-break is blind to
it. Job peers are not ordered: the buyer's client starts first by construction (docs/nat.md).

``SendOrder`` is pure (the clocks are the caller's); ``StaggeredSends`` is the daemon's part, a
mixin of clawnode.daemon's Agent as clawnode.retirement's is.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from . import reconcile, wire
from .backends.base import PeerStatus, WireGuardBackend
from .reconcile import Action, Add, Update

__all__ = ["NODE_REF_PREFIX", "STAGGER_SECONDS", "SendOrder", "StaggeredSends", "sends_second"]

NODE_REF_PREFIX = "node:"  # meshnet.mesh.MESH_REF_PREFIX: a node-to-node peer's ref
# How long the second side waits. Above: the skew between the two nodes applying one push (sent to
# both in one fan-out, tens of milliseconds apart, more under load), plus one path's latency, so
# the first side's initiation has arrived and been answered; and above wireguard-go's retry
# jitter (a lost initiation is sent again after 5 s plus up to 1/3 s at random), so that when both
# first initiations are lost (neither NAT open yet) the two retries stay apart as well, which
# 0.3 s (the NAT matrix's, on one machine) would not ensure. It costs a second only where the
# first side's initiation is dropped (the second side's NAT not open for it yet), against the
# 5 s retry that a crossing costs and the 120 s a lost race does.
STAGGER_SECONDS = 1.0


def sends_second(desired: wire.DesiredState, spec: wire.PeerSpec) -> bool:
    """Whether this node (``desired.node_id``) starts sending to ``spec`` after the other side:
    a node-to-node peer with an endpoint whose node id sorts before this node's. Both nodes of a
    pair compute it from their own states and come to opposite answers."""
    if spec.kind != "mesh" or not spec.endpoint or not spec.ref.startswith(NODE_REF_PREFIX):
        return False  # a job peer, the hub, or a node that has no endpoint to send to yet
    return spec.ref[len(NODE_REF_PREFIX) :] < desired.node_id


def starts_sending(action: Add | Update, status: PeerStatus | None, now: int) -> bool:
    """Whether applying ``action`` could make the device send a handshake initiation now: it
    gives the peer an endpoint, or turns its keepalive on, and the peer has no live session (a
    keepalive over a session is a data packet, not an initiation)."""
    if status is not None and reconcile.has_recent_handshake(status, now):
        return False
    if isinstance(action, Add):
        return bool(action.endpoint)
    was_off = status is None or not status.persistent_keepalive
    return "endpoint" in action.changed or (
        "keepalive" in action.changed and action.keepalive > 0 and was_off
    )


def held_back(action: Add | Update, status: PeerStatus | None) -> Add | Update | None:
    """``action`` without what makes the device send: no endpoint given, the keepalive left as
    it is (off for a new peer). None when nothing else was to change."""
    if isinstance(action, Add):
        return Add(action.public_key, action.allowed_ips)
    changed = tuple(c for c in action.changed if c not in ("endpoint", "keepalive"))
    if not changed:
        return None
    keepalive = status.persistent_keepalive if status is not None else 0
    return Update(action.public_key, action.allowed_ips, "", keepalive, changed)


@dataclass
class _Hold:
    endpoint: str  # the desired endpoint held back; another one is held afresh
    due: float  # when it is given to the device (the caller's monotonic clock)
    released: bool = False  # the daemon has planned again since ``due``


class SendOrder:
    """The node-to-node peers this node sends to second, each held back until its due time."""

    def __init__(self, stagger: float = STAGGER_SECONDS) -> None:
        self.stagger = stagger
        self._holds: dict[str, _Hold] = {}

    def order(
        self,
        desired: wire.DesiredState,
        actual: Mapping[str, PeerStatus],
        actions: list[Action],
        now: int,
        clock: float,
    ) -> list[Action]:
        """``actions`` (reconcile.plan of ``desired`` against ``actual``) with the sends of the
        peers this node sends to second held back until ``stagger`` after ``clock`` first found
        them about to start (``now``: Unix seconds, for the handshakes; ``clock``: monotonic)."""
        second = {spec.public_key: spec for spec in desired.peers if sends_second(desired, spec)}
        for key in self._holds.keys() - second.keys():
            del self._holds[key]  # the peer left, or has no endpoint: held afresh if it comes back
        if not second:
            return actions  # most nodes: no multi-node order, nothing to order
        ordered: list[Action] = []
        for action in actions:
            key = action.public_key
            spec = second.get(key)
            status = actual.get(key)
            if (
                spec is not None
                and isinstance(action, (Add, Update))
                and starts_sending(action, status, now)
            ):
                hold = self._holds.get(key)
                if hold is None or hold.endpoint != spec.endpoint:
                    hold = self._holds[key] = _Hold(spec.endpoint, clock + self.stagger)
                if clock < hold.due:
                    kept = held_back(action, status)
                    if kept is not None:
                        ordered.append(kept)
                    continue
                hold.released = True
            ordered.append(action)
        return ordered

    def pending(self) -> float | None:
        """When the next held peer is due (monotonic), or None if none is held."""
        return min((h.due for h in self._holds.values() if not h.released), default=None)

    def release(self, clock: float) -> set[str]:
        """The peers due by ``clock`` and not yet planned again since, now marked planned."""
        keys = set()
        for key, hold in self._holds.items():
            if not hold.released and hold.due <= clock:
                hold.released = True
                keys.add(key)
        return keys


class StaggeredSends:
    """The daemon's part: a session task that plans the held peers again when they are due."""

    backend: WireGuardBackend
    say: Callable[[str], None]
    _lock: asyncio.Lock
    _view: dict[str, PeerStatus] | None
    _desired: wire.DesiredState | None
    _named_endpoints: dict[str, str]
    _order: SendOrder
    _order_due: asyncio.Event  # set when a peer was held: the task below has a time to wait for

    async def _send(self, ws: Any, frame: dict[str, Any]) -> None:
        raise NotImplementedError  # the Agent's

    async def _apply(
        self, desired: wire.DesiredState, actions: list[reconcile.Action]
    ) -> dict[str, str]:
        raise NotImplementedError  # the Agent's

    async def _staggered(self, ws: Any) -> None:
        while True:
            due = self._order.pending()
            if due is None:
                self._order_due.clear()
                await self._order_due.wait()
                continue
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            await self._release_held(ws)

    async def _release_held(self, ws: Any) -> None:
        """Give the peers now due what was held back, planned afresh against the device as it is
        now: a handshake the first side's initiation brought meanwhile shows there, and then
        the endpoint WireGuard learned from it is kept (reconcile.plan)."""
        async with self._lock:
            keys = self._order.release(time.monotonic())
            desired = self._desired
            if not keys or desired is None:
                return  # a new session starts over: its first reconcile plans them again
            self._view = await asyncio.to_thread(self.backend.list_peers)
            now = int(time.time())
            actions = reconcile.plan(desired, self._view, now=now, previous=self._named_endpoints)
            actions = self._order.order(desired, self._view, actions, now, time.monotonic())
            actions = [a for a in actions if a.public_key in keys]
            if not actions:
                return
            results = await self._apply(desired, actions)
        failed = sorted(key for key, result in results.items() if result != reconcile.OK)
        sent = ", ".join(f"{a.public_key[:8]}…" for a in actions)
        self.say(f"started sending to node peer(s) {sent}, second of their pairs")
        if failed:
            note = f"starting to send to node peer {failed[0][:8]}… failed: {results[failed[0]]}"
            self.say(note)
            await self._send(ws, {"type": "report", "detail": note[:500]})
