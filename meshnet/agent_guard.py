"""What an agent's websocket may cost the gateway, checked before a frame reaches the consumer's
handlers (meshnet.consumers.AgentConsumer.websocket_receive).

- Frame size, on the raw text before any parsing: MOLT_AGENT_PREAUTH_MAX_BYTES (4 KiB; the auth
  frame is about 310 bytes) until the socket has authenticated, MOLT_AGENT_MAX_FRAME_BYTES
  (1 MiB) after. Over it: close 1009 (wire.CLOSE_TOO_BIG). The web server's own --ws-max-size
  is the post-auth limit, so it never buffers a frame bigger than that.
- Binary frames, text that is not JSON, JSON that is not an object with a type, and JSON nested
  deeper than MAX_DEPTH: close 4400 (wire.CLOSE_BAD_MESSAGE), never a traceback.
- Sockets per client address (the address the HTTP rate limits count: X-Forwarded-For only
  behind MOLT_TRUSTED_PROXIES): MOLT_AGENT_UNAUTHENTICATED_PER_ADDRESS not yet authenticated
  and MOLT_AGENT_CONNECTIONS_PER_ADDRESS in all; over either: close 1013 (wire.CLOSE_TRY_LATER).
  The counters are in-process, so the caps hold per web process.
- Frames per node and kind after auth (RATES): token buckets kept per node id in-process (a
  reconnect does not refill them). A heartbeat, inventory or report over its rate says nothing
  new and is dropped (counted, logged once per socket); a socket that has had MAX_DROPS dropped
  is closed 4429 (wire.CLOSE_RATE_LIMITED). Metering, ack, removed and sandbox_status carry
  signed facts that dropping would lose, so one over its rate closes the socket 4429 at once:
  the agent reconnects with backoff and sends its state again on the next session.
  MOLT_AGENT_RATE_FACTOR multiplies every rate and burst.

The rates are several times what a real agent sends (clawnode.daemon.Timing: a heartbeat
every 5 s, inventory every 60 s and at each welcome, metering every 10 s plus one sample per
removal round, an ack for each desired state the gateway pushes, a sandbox report at most every
second), with bursts that cover a reconnect's welcome traffic.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from clawnode import wire
from django.conf import settings

from meshnet.agent_channel import AgentRefused
from meshnet.throttling import client_address

log = logging.getLogger(__name__)

# No frame of the protocol nests deeper than 6 (a sandbox report's ports in a signed envelope).
MAX_DEPTH = 32

DROP, CLOSE = "drop", "close"


@dataclass(frozen=True)
class Rate:
    per_second: float
    burst: float
    on_excess: str  # DROP or CLOSE


# Bucket per group of kinds; an agent's normal period for each is in the comment.
RATES: dict[str, Rate] = {
    "heartbeat": Rate(1.0, 10, DROP),  # every 5 s
    "inventory": Rate(0.2, 10, DROP),  # every 60 s, and after each welcome
    "report": Rate(0.2, 10, DROP),  # only on a refused state or drift; connectivity: 300 s
    "round_trips": Rate(0.1, 10, DROP),  # every 60 s (clawnode.rtt)
    "metering": Rate(2.0, 100, CLOSE),  # every 10 s, finals at welcome, one per removal round
    "state": Rate(10.0, 200, CLOSE),  # ack/removed/sandbox_status: follow the gateway's pushes
}
KIND_BUCKET = {
    "heartbeat": "heartbeat",
    "inventory": "inventory",
    "report": "report",
    "connectivity": "report",
    "round_trips": "round_trips",
    "metering": "metering",
    "ack": "state",
    "removed": "state",
    "sandbox_status": "state",
}


def scaled(rate: Rate) -> Rate:
    factor = settings.MOLT_AGENT_RATE_FACTOR
    return Rate(rate.per_second * factor, rate.burst * factor, rate.on_excess)


MAX_DROPS = 100  # dropped frames one socket may send before it is closed
MAX_NODES_TRACKED = 20_000  # per-node buckets kept (least recently used forgotten first)


# -- frames ----------------------------------------------------------------------------------


def frame_text(message: dict[str, Any], *, authenticated: bool) -> str:
    """The text of a websocket.receive message, refused when binary or over the size limit.
    Checked before parsing: an oversized frame costs no JSON work."""
    text = message.get("text")
    if text is None:
        raise AgentRefused("binary frames are not part of the protocol", wire.CLOSE_BAD_MESSAGE)
    if authenticated:
        limit, when = settings.MOLT_AGENT_MAX_FRAME_BYTES, ""
    else:
        limit, when = settings.MOLT_AGENT_PREAUTH_MAX_BYTES, " before auth"
    # isascii() is O(1) on str; only non-ASCII text is encoded to count its bytes.
    size = len(text) if text.isascii() or len(text) * 4 <= limit else len(text.encode())
    if size > limit:
        raise AgentRefused(
            f"frame of {size} bytes is over the {limit}-byte limit{when}", wire.CLOSE_TOO_BIG
        )
    return text


def parse_frame(text: str) -> dict[str, Any]:
    """A JSON object with a string type, nested at most MAX_DEPTH deep."""
    try:
        content = json.loads(text)
    except RecursionError:  # nested about a thousand deep: the C parser gives up on it
        raise AgentRefused(
            f"frame nested deeper than {MAX_DEPTH}", wire.CLOSE_BAD_MESSAGE
        ) from None
    except ValueError:
        raise AgentRefused("frame is not JSON", wire.CLOSE_BAD_MESSAGE) from None
    if not isinstance(content, dict) or not isinstance(content.get("type"), str):
        raise AgentRefused("frames must be JSON objects with a type", wire.CLOSE_BAD_MESSAGE)
    if not within_depth(content, MAX_DEPTH):
        raise AgentRefused(f"frame nested deeper than {MAX_DEPTH}", wire.CLOSE_BAD_MESSAGE)
    return content


def within_depth(value: Any, limit: int) -> bool:
    """Whether no container in value is nested deeper than limit (iterative: a deep value
    cannot exhaust the stack here, nor later in code that recurses over it)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return False
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return True


# -- sockets per address ---------------------------------------------------------------------

_unauthenticated: Counter[str] = Counter()
_total: Counter[str] = Counter()


def scope_address(scope: dict[str, Any]) -> str:
    """The client address by the rule of the HTTP limits (meshnet.throttling.client_address)."""
    client = scope.get("client")
    headers = {}
    for name, value in scope.get("headers") or ():
        if name == b"x-forwarded-for":
            headers["x-forwarded-for"] = value.decode("latin-1")
    request = SimpleNamespace(META={"REMOTE_ADDR": client[0] if client else ""}, headers=headers)
    return client_address(request) or ""


def _over(count: int, limit: int) -> bool:
    return limit > 0 and count > limit


_cap_refusals = {"count": 0, "since": 0.0}


def _note_cap_refusal(address: str) -> None:
    """Log sockets refused over the caps once a minute with their count, not one line each
    (a flood would fill the log)."""
    _cap_refusals["count"] += 1
    now = time.monotonic()
    if now - _cap_refusals["since"] >= 60:
        log.warning(
            "%d agent connection(s) refused over the per-address caps in the last minute "
            "(1013; latest from %s)",
            _cap_refusals["count"],
            address,
        )
        _cap_refusals.update(count=0, since=now)


# -- per-node rates --------------------------------------------------------------------------


@dataclass
class Bucket:
    rate: Rate
    tokens: float
    stamp: float

    def take(self, now: float) -> bool:
        self.tokens = min(self.rate.burst, self.tokens + (now - self.stamp) * self.rate.per_second)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def full(self, now: float) -> bool:
        return self.tokens + (now - self.stamp) * self.rate.per_second >= self.rate.burst


@dataclass
class NodeBuckets:
    buckets: dict[str, Bucket] = field(default_factory=dict)

    def take(self, group: str, now: float) -> bool:
        bucket = self.buckets.get(group)
        if bucket is None:
            rate = scaled(RATES[group])
            bucket = self.buckets[group] = Bucket(rate, rate.burst, now)
        return bucket.take(now)

    def idle(self, now: float) -> bool:
        return all(bucket.full(now) for bucket in self.buckets.values())


_nodes: OrderedDict[str, NodeBuckets] = OrderedDict()


def _node_buckets(node_id: str) -> NodeBuckets:
    buckets = _nodes.get(node_id)
    if buckets is None:
        buckets = _nodes[node_id] = NodeBuckets()
        while len(_nodes) > MAX_NODES_TRACKED:
            _nodes.popitem(last=False)
    else:
        _nodes.move_to_end(node_id)
    return buckets


def reset() -> None:
    """Forget every counter and bucket (tests)."""
    _unauthenticated.clear()
    _total.clear()
    _nodes.clear()


# -- one socket ------------------------------------------------------------------------------


class ConnectionGuard:
    """The guard of one agent socket: admit() on connect, frame() for each message received,
    authenticated() once the node is known, release() when it ends (idempotent)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.node_id = ""
        self.admitted = False
        self.drops = 0

    def admit(self) -> None:
        """Count this socket against its address; refused (1013) over either cap."""
        _unauthenticated[self.address] += 1
        _total[self.address] += 1
        self.admitted = True
        if _over(
            _unauthenticated[self.address], settings.MOLT_AGENT_UNAUTHENTICATED_PER_ADDRESS
        ) or _over(_total[self.address], settings.MOLT_AGENT_CONNECTIONS_PER_ADDRESS):
            _note_cap_refusal(self.address)
            raise AgentRefused(
                "too many agent connections from this address; retry later",
                wire.CLOSE_TRY_LATER,
            )

    def authenticated(self, node_id: str) -> None:
        if self.node_id:
            return
        self.node_id = node_id
        if self.admitted:
            _decrement(_unauthenticated, self.address)

    def release(self) -> None:
        if not self.admitted:
            return
        self.admitted = False
        _decrement(_total, self.address)
        if not self.node_id:
            _decrement(_unauthenticated, self.address)
        else:
            buckets = _nodes.get(self.node_id)
            if buckets is not None and buckets.idle(time.monotonic()):
                del _nodes[self.node_id]  # a fresh one is the same as a full one

    def frame(self, message: dict[str, Any]) -> dict[str, Any] | None:
        """The parsed frame, or None when it is dropped (over its rate); AgentRefused (with
        its close code) when the socket must close."""
        content = parse_frame(frame_text(message, authenticated=bool(self.node_id)))
        group = KIND_BUCKET.get(content["type"]) if self.node_id else None
        if group is None:  # before auth, or an unknown kind: the consumer refuses it
            return content
        if _node_buckets(self.node_id).take(group, time.monotonic()):
            return content
        kind = content["type"]
        if RATES[group].on_excess == CLOSE:
            raise AgentRefused(f"{kind} frames faster than allowed", wire.CLOSE_RATE_LIMITED)
        self.drops += 1
        if self.drops == 1:
            log.warning("agent %s: %s frames over their rate, dropped", self.node_id, kind)
        if self.drops >= MAX_DROPS:
            raise AgentRefused(
                f"{self.drops} frames dropped over their rate", wire.CLOSE_RATE_LIMITED
            )
        return None


def _decrement(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]
