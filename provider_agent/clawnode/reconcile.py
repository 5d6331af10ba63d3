"""Peer reconciliation: a pure plan, then an executor that applies it one peer at a time.

``plan(desired, actual)`` compares the signed desired state with what the interface has and
returns the smallest list of per-peer actions. It never replaces the whole peer set: that would
reset every peer's counters (metering) and drop live sessions. A peer whose settings drift is
updated in place, which keeps its counters and its session.

``apply(backend, actions)`` runs the actions in order and records a result per peer; one
failure does not stop the others (the acknowledgement reports each peer's result).

A peer that is no longer desired leaves in two steps. ``plan`` *retires* it: its allowed IPs
are emptied and its keepalive stopped, one cheap ``set`` that cuts the buyer off at once (no
packet is routed to or accepted from it). Its removal waits for its final counters: reading
them is a dump of every peer (wireguard-go has no per-peer read, and at a thousand peers the
dump is most of a removal's cost), so the daemon reads the peers ``retired`` returns later, in
one read for all of them or with a metering sample that reads every peer anyway, then
``Remove``s them (see the daemon's _finish_removals).

``plan`` is pure: no I/O, no clock; the same inputs give the same list.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from .backends.base import PeerStatus, WireGuardBackend
from .cidr import sorted_networks
from .wire import DesiredState, PeerSpec, parse_endpoint

__all__ = [
    "OK",
    "RECENT_HANDSHAKE_SECONDS",
    "Action",
    "Add",
    "Remove",
    "Retire",
    "Update",
    "apply",
    "has_recent_handshake",
    "is_retired",
    "leaving",
    "named_endpoints",
    "plan",
    "retired",
    "update_view",
]

OK = "ok"


@dataclass(frozen=True)
class Add:
    public_key: str
    allowed_ips: tuple[str, ...]
    endpoint: str = ""
    keepalive: int = 0


@dataclass(frozen=True)
class Update:
    """Change a peer in place (WireGuard keeps its counters and session)."""

    public_key: str
    allowed_ips: tuple[str, ...]
    endpoint: str = ""
    keepalive: int = 0
    changed: tuple[str, ...] = ()  # which of allowed_ips, endpoint, keepalive differ (for logs)


@dataclass(frozen=True)
class Retire:
    """Cut a peer that is no longer desired off (no allowed IPs, no keepalive), keeping it and
    its counters on the interface until they are read."""

    public_key: str


@dataclass(frozen=True)
class Remove:
    """Take a retired peer off the interface (its final counters were read)."""

    public_key: str


Action = Add | Update | Retire | Remove


def _networks(values: Sequence[str]) -> frozenset[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return frozenset(ipaddress.ip_network(v, strict=False) for v in values)


def _same_networks(desired: Sequence[str], actual: Sequence[str]) -> bool:
    """Whether two lists of allowed IPs are the same set of networks.

    Both sides are canonical CIDR text almost always (PeerSpec insists on it, the backends
    write it), so equal text settles it without parsing; only text that differs is parsed,
    since two spellings can name one network. Parsing every network of every peer made this
    most of a plan's cost at a thousand peers.
    """
    if desired == actual or set(desired) == set(actual):
        return True
    return _networks(desired) == _networks(actual)


def _endpoint_differs(desired: str, actual: str) -> bool:
    """Whether the peer's endpoint must be set again.

    "" desired means no opinion: a job peer (a buyer) roams and WireGuard learns its endpoint
    from its handshakes; overwriting it would cut the buyer off. An IP endpoint is compared by
    value. A host name cannot be compared without resolving it (which a pure plan must not do):
    it is set again only when the actual endpoint is unknown or its port differs.
    """
    if not desired:
        return False
    if not actual:
        return True
    want_host, want_port = parse_endpoint(desired)
    try:
        have_host, have_port = parse_endpoint(actual)
    except ValueError:
        return True
    if want_port != have_port:
        return True
    try:
        return ipaddress.ip_address(want_host) != ipaddress.ip_address(have_host)
    except ValueError:
        return False  # a host name on the desired side: see above


def _changes(spec: PeerSpec, status: PeerStatus) -> tuple[str, ...]:
    changed = []
    if not _same_networks(spec.allowed_ips, status.allowed_ips):
        changed.append("allowed_ips")
    if _endpoint_differs(spec.endpoint, status.endpoint):
        changed.append("endpoint")
    if spec.persistent_keepalive != status.persistent_keepalive:
        changed.append("keepalive")
    return tuple(changed)


# A peer with a handshake this recent has a working endpoint (WireGuard's own, roamed from its
# authenticated packets): the gateway's view of the other side may be older than the session,
# so a desired endpoint never replaces it (design/network.md, docs/nat.md: coordinated punching).
RECENT_HANDSHAKE_SECONDS = 180


def has_recent_handshake(status: PeerStatus, now: int | None) -> bool:
    """Whether the peer handshook less than RECENT_HANDSHAKE_SECONDS before ``now``: it has a
    working session (and, for wireguard-go, a current keypair to send over)."""
    return (
        now is not None
        and status.last_handshake > 0
        and now - status.last_handshake < RECENT_HANDSHAKE_SECONDS
    )


def named_endpoints(desired: DesiredState) -> dict[str, str]:
    """The endpoint ``desired`` names for each peer that has one, by public key: what the
    caller keeps of the state it applied, to pass to the next ``plan`` as ``previous``."""
    return {spec.public_key: spec.endpoint for spec in desired.peers if spec.endpoint}


def _still_named(previous: Mapping[str, str] | None, status: PeerStatus) -> bool:
    """Whether the peer's endpoint is still the one the previous desired state named (compared
    by value, as _endpoint_differs does), not one WireGuard roamed to since."""
    named = previous.get(status.public_key, "") if previous else ""
    return bool(named and status.endpoint) and not _endpoint_differs(named, status.endpoint)


def plan(
    desired: DesiredState,
    actual: Mapping[str, PeerStatus],
    now: int | None = None,
    previous: Mapping[str, str] | None = None,
) -> list[Action]:
    """Per-peer actions that turn ``actual`` into ``desired``.

    ``now`` (Unix seconds; the caller's clock, so the plan stays pure): an endpoint change for
    a peer whose latest handshake is less than RECENT_HANDSHAKE_SECONDS old is left out (its
    other changes still apply); without ``now`` every endpoint change is planned.

    ``previous`` (``named_endpoints`` of the desired state applied before this one; None or
    empty after a restart): the one exception. A peer whose endpoint is still the one the
    gateway named last has not roamed: the live session runs where the gateway sent it, so
    the gateway's new choice replaces it despite the handshake. That is how a relayed path
    moves to the buyer's mapping when an upgrade starts, and back to the relay when it is
    given up (docs/nat.md, "Upgrading a relayed path"). An endpoint WireGuard roamed to is
    kept, as is every endpoint when there is no previous state to tell the two apart.

    Order: retirements, then updates, then additions, each sorted by public key. Retirements go
    first so allowed networks a leaving peer held are free before another peer claims them. A
    leaving peer already retired needs nothing here: see ``retired``.

    Only the actions are sorted, not the thousand keys they were picked from: sorting every
    key on both sides was a third of a plan's cost for a one-peer change.
    """
    wanted = {spec.public_key: spec for spec in desired.peers}
    removes: list[Action] = [
        Retire(key) for key in sorted(actual.keys() - wanted.keys()) if not is_retired(actual[key])
    ]
    updates: list[Update] = []
    adds: list[Add] = []
    for key, spec in wanted.items():
        status = actual.get(key)
        if status is None:
            adds.append(Add(key, spec.allowed_ips, spec.endpoint, spec.persistent_keepalive))
            continue
        if (
            # The common case, decided without a call: _changes would find nothing.
            spec.allowed_ips == status.allowed_ips
            and (not spec.endpoint or spec.endpoint == status.endpoint)
            and spec.persistent_keepalive == status.persistent_keepalive
        ):
            continue
        changed = _changes(spec, status)
        endpoint = spec.endpoint
        if (
            "endpoint" in changed
            and has_recent_handshake(status, now)
            and not _still_named(previous, status)
        ):
            # set_peer with no endpoint keeps the one the peer has.
            changed = tuple(c for c in changed if c != "endpoint")
            endpoint = ""
        if changed:
            updates.append(
                Update(key, spec.allowed_ips, endpoint, spec.persistent_keepalive, changed)
            )
    updates.sort(key=_by_key)
    adds.sort(key=_by_key)
    return [*removes, *updates, *adds]


def _by_key(action: Add | Update) -> str:
    return action.public_key


def is_retired(status: PeerStatus) -> bool:
    """Whether a peer is cut off (see ``Retire``): no allowed IPs, no keepalive."""
    return not status.allowed_ips and not status.persistent_keepalive


def leaving(desired: DesiredState, actual: Mapping[str, PeerStatus]) -> list[str]:
    """The peers on the interface that ``desired`` no longer has, retired or not yet, sorted:
    the acknowledgement names them, so the gateway waits for their final counters."""
    wanted = {spec.public_key for spec in desired.peers}
    return sorted(actual.keys() - wanted)


def retired(desired: DesiredState, actual: Mapping[str, PeerStatus]) -> list[str]:
    """The leaving peers already cut off (see ``Retire``), sorted: what is left is to read their
    final counters and ``Remove`` them."""
    return [key for key in leaving(desired, actual) if is_retired(actual[key])]


def apply(backend: WireGuardBackend, actions: Sequence[Action]) -> dict[str, str]:
    """Apply ``actions`` in order; return {public key: "ok" or "error: <why>"} for each.

    Every action is attempted: a peer the device refuses must not keep the others from being
    applied. Exceptions of any kind are recorded, not raised, for the same reason.
    """
    results: dict[str, str] = {}
    for action in actions:
        try:
            if isinstance(action, Remove):
                backend.remove_peer(action.public_key)
            elif isinstance(action, Retire):
                backend.set_peer(action.public_key, (), keepalive=0)
            else:
                if isinstance(action, Update) and _sends_at_once(action):
                    backend.set_peer(
                        action.public_key, action.allowed_ips, endpoint=action.endpoint
                    )
                backend.set_peer(
                    action.public_key,
                    action.allowed_ips,
                    endpoint=action.endpoint,
                    keepalive=action.keepalive,
                )
        except Exception as exc:
            results[action.public_key] = f"error: {exc}" if str(exc) else f"error: {exc!r}"
        else:
            results[action.public_key] = OK
    return results


def _sends_at_once(action: Update) -> bool:
    """Whether a moved endpoint must be sent to now: the peer keeps its keepalive across the move.

    WireGuard sends to a new endpoint only with the peer's next packet, and roams back to
    wherever an authenticated packet comes from. When a relayed path tries the direct one (or
    goes back to the relay), the buyer's next packet through the relay reached the node before
    the node's next keepalive (both 25 s) and moved it back: the try never sent a packet
    (docs/nat.md, "Upgrading a relayed path"). Turning keepalive on from 0 makes both
    wireguard-go and the kernel send one keepalive at once, to the endpoint just set; so the
    move is applied with keepalive 0 first, then with its own."""
    return (
        action.keepalive > 0 and "endpoint" in action.changed and "keepalive" not in action.changed
    )


def update_view(
    view: dict[str, PeerStatus], actions: Sequence[Action], results: Mapping[str, str]
) -> bool:
    """Change ``view`` (the interface's peers as the agent believes them to be) to what the
    interface holds after ``actions`` did what ``results`` say. False when a change was refused:
    that peer is in an unknown state, and the view is not to be used until the device is read
    again."""
    for action in actions:
        key = action.public_key
        if results.get(key) != OK:
            return False
        if isinstance(action, Remove):
            view.pop(key, None)
            continue
        previous = view.get(key) or PeerStatus(public_key=key, allowed_ips=())
        if isinstance(action, Retire):
            view[key] = replace(previous, allowed_ips=(), persistent_keepalive=0)
            continue
        view[key] = PeerStatus(
            public_key=key,
            allowed_ips=sorted_networks(action.allowed_ips),
            endpoint=action.endpoint or previous.endpoint,
            rx_bytes=previous.rx_bytes,
            tx_bytes=previous.tx_bytes,
            last_handshake=previous.last_handshake,
            persistent_keepalive=action.keepalive,
        )
    return True
