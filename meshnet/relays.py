"""Relays on the gateway's side: tokens, which job peer goes through which relay, the pairs a
relay serves, and each peer's path (docs/nat.md, step 3; the relay process is meshnet.relay).

When a job peer is created (meshnet.peers.create_job_peer calls `maybe_relay` in its
transaction) and MOLT_RELAY_MODE wants it relayed, it gets a port pair on a live relay: the
node's region first, then relays that serve any region, the one with the fewest pairs. The
node's signed desired state then names `relay:provider_port` as the buyer peer's endpoint
(meshnet.desired_state) and the buyer's wg-quick file `relay:buyer_port` as the provider's
(`buyer_endpoint`). No relay live: the peer goes direct, as before. The pair is released when
the peer leaves the node's desired state.

Why decide when the order starts: a buyer's stock WireGuard client has one endpoint per peer,
fixed by the file it downloaded; the gateway can change the node's side at any time, the
buyer's only through WireGuard's own roaming. So a peer that might need a relay starts on it.

The upgrade to direct goes through that roaming, in two steps driven by the relay's polls
(`record_relay_poll`): when a relayed peer's node no longer wants a relay (it declared an
endpoint since, or the mode changed) and the hub knows the buyer's mapping, `start_upgrades`
points the node's side at the buyer's mapping (a new revision) and keeps the pair open; a buyer
whose NAT lets the node's packets in roams to the node, one whose NAT does not keeps sending
through the relay, which roams the node back. `settle_upgrades` then decides from what moved:
the relay forwarded nothing for a while as the node kept receiving from the buyer: direct, the
pair is freed; no such quiet within a deadline: the upgrade did not take, the node's side goes
back to the relay.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Q
from django.utils import timezone

from meshnet import signals
from meshnet.models import JobPeer, Node, Relay, RelayAllocation

TOKEN_PREFIX = "molt_relay_"  # noqa: S105 (a prefix, not a secret)
DIRECT, RELAYED = "direct", "relayed"
# The upgrade to direct (start_upgrades, settle_upgrades). Direct once the relay has carried
# nothing of the pair for UPGRADE_QUIET_SECONDS while the node received from the buyer: longer
# than two of the buyer's keepalives (25 s), so a buyer still sending through the relay has
# moved bytes there. Given up when that has not happened UPGRADE_GIVE_UP_SECONDS after the start.
UPGRADE_QUIET_SECONDS = 60
UPGRADE_GIVE_UP_SECONDS = 300


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def issue_relay_token(relay: Relay) -> str:
    """A new token for `relay` (the old one stops working); shown once, stored hashed. The
    prefix makes a leaked token easy to find with grep."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    Relay.objects.filter(pk=relay.pk).update(
        token_hash=_hash(token), token_prefix=token[: len(TOKEN_PREFIX) + 4]
    )
    relay.refresh_from_db(fields=["token_hash", "token_prefix"])
    return token


def authenticate_relay(token: str) -> Relay | None:
    """The enabled relay whose token this is, or None."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    digest = _hash(token)
    relay = Relay.objects.filter(token_hash=digest, enabled=True).first()
    if relay is None or not hmac.compare_digest(relay.token_hash, digest):
        return None
    return relay


def live_relays():
    since = timezone.now() - timedelta(seconds=settings.MOLT_RELAY_LIVE_SECONDS)
    return Relay.objects.filter(enabled=True, last_seen_at__gte=since).exclude(token_hash="")


def wants_relay(node: Node) -> bool:
    mode = settings.MOLT_RELAY_MODE
    if mode == "always":
        return True
    # A node that declared an endpoint said where it is reachable (public, or a forwarded
    # port): buyers reach it directly.
    return mode == "nat" and not node.declared_endpoint


def pick_relay(node: Node) -> Relay | None:
    """A live relay for `node`: of its region, else one serving any region; fewest pairs."""
    candidates = (
        live_relays()
        .filter(Q(region=node.region) | Q(region=""))
        .annotate(pairs=Count("allocations"))
    )
    ranked = sorted(candidates, key=lambda relay: (relay.region != node.region, relay.pairs))
    return ranked[0] if ranked else None


def first_free_pair(low: int, high: int, used_buyer_ports: set[int]) -> tuple[int, int] | None:
    """The first (buyer_port, provider_port) of the range not in use: pairs are (low, low+1),
    (low+2, low+3), ... (pure)."""
    for buyer_port in range(low, high, 2):
        if buyer_port not in used_buyer_ports:
            return buyer_port, buyer_port + 1
    return None


def maybe_relay(peer: JobPeer, node: Node) -> RelayAllocation | None:
    """Put a new job peer on a relay when MOLT_RELAY_MODE wants it and one is live; None when
    it goes direct (no relay live, or every live relay's ports taken). Call inside the
    transaction that created the peer. Locks: the chosen relay's row (ports are handed out
    under it; the unique constraints are the guarantee)."""
    if not wants_relay(node):
        return None
    relay = pick_relay(node)
    if relay is None:
        return None
    locked = Relay.objects.select_for_update().get(pk=relay.pk)
    used = set(locked.allocations.values_list("buyer_port", flat=True))
    ports = first_free_pair(locked.port_low, locked.port_high, used)
    if ports is None:
        # Full: the peer goes direct (docs/operations.md: size the port range for the load).
        return None
    return RelayAllocation.objects.create(
        relay=locked, job_peer=peer, buyer_port=ports[0], provider_port=ports[1]
    )


def release_relay(peer: JobPeer) -> None:
    """The peer left its node's desired state: its relay pair goes (the relay closes it at its
    next poll)."""
    RelayAllocation.objects.filter(job_peer=peer).delete()


def allocation_of(peer: JobPeer) -> RelayAllocation | None:
    try:
        return peer.relay_allocation
    except RelayAllocation.DoesNotExist:
        return None


def buyer_endpoint(peer: JobPeer) -> str:
    """What the buyer's wg-quick file names as the provider's Endpoint."""
    allocation = allocation_of(peer)
    return allocation.buyer_endpoint if allocation is not None else peer.node.endpoint


def path_of(peer: JobPeer | None) -> dict | None:
    """The order's path as the API and the order page show it, with the latest round trip
    the node measured across it (round_trip_of)."""
    if peer is None:
        return None
    allocation = allocation_of(peer)
    if allocation is None:
        return {"kind": DIRECT, "relay": None, "region": None, "round_trip": round_trip_of(peer)}
    return {
        "kind": RELAYED,
        "relay": allocation.relay.name,
        "region": allocation.relay.region or None,
        "round_trip": round_trip_of(peer),
    }


def round_trip_of(peer: JobPeer) -> dict | None:
    """The node's latest ping of the buyer's tunnel address (meshnet.round_trips): `answered`,
    `ms` (null without an answer) and `measured_at`; None before any."""
    if peer.rtt_measured_at is None:
        return None
    answered = peer.rtt_us is not None
    return {
        "answered": answered,
        "ms": peer.rtt_us / 1000 if peer.rtt_us is not None else None,
        "measured_at": peer.rtt_measured_at,
    }


def relay_pairs(relay: Relay) -> list[dict]:
    """The pairs `relay` serves (what its control request gets): public keys only."""
    rows = (
        RelayAllocation.objects.filter(relay=relay)
        .exclude(job_peer__state=JobPeer.State.REMOVED)
        .select_related("job_peer__node")
        .order_by("id")
    )
    return [
        {
            "id": f"peer-{row.job_peer_id}",
            "buyer_port": row.buyer_port,
            "provider_port": row.provider_port,
            "buyer_key": row.job_peer.public_key,
            "provider_key": row.job_peer.node.wireguard_public_key,
        }
        for row in rows
    ]


def record_relay_poll(relay: Relay, status: dict) -> list[dict]:
    """A relay asked for its pairs: remember when, and what it reported (its load); settle the
    upgrades to direct its report decides and start those that became possible. Returns its
    pairs. One transaction."""
    now = timezone.now()
    trimmed = _trim_status(status)
    with transaction.atomic():
        # What the relay reported on its previous poll (a relay polls one request at a time).
        before = _reported_bytes(
            Relay.objects.values_list("last_status", flat=True).get(pk=relay.pk) or {}
        )
        Relay.objects.filter(pk=relay.pk).update(last_seen_at=now, last_status=trimmed)
        reported = _reported_bytes(trimmed)
        mark_bound(relay, set(reported), now)
        settle_upgrades(relay, reported, now)
        ready = _handshaken(trimmed) & {
            peer_id for peer_id, count in reported.items() if before.get(peer_id) == count
        }
        start_upgrades(relay, reported, now, ready=ready)
        return relay_pairs(relay)


def _reported_bytes(status: dict) -> dict[int, int]:
    """Bytes the relay reported per job peer id."""
    return {
        peer_id: entry["bytes"]
        for entry in status.get("pairs", ())
        if (peer_id := _peer_id(entry)) is not None
    }


def _handshaken(status: dict) -> set[int]:
    """The job peers whose pair the relay reported handshaken: both sides heard, a handshake
    made through it."""
    return {
        peer_id
        for entry in status.get("pairs", ())
        if entry["handshaken"] and (peer_id := _peer_id(entry)) is not None
    }


def _peer_id(entry: dict) -> int | None:
    """The job peer a reported pair belongs to (the relay names its pairs peer-<id>)."""
    prefix, _, number = entry["id"].partition("-")
    return int(number) if prefix == "peer" and number.isdigit() else None


def mark_bound(relay: Relay, reported: set[int], now) -> int:
    """Record that `relay` has bound the pairs of the job peers it `reported` (it reports only
    pairs whose ports it has bound) and give their nodes the relay as the peers' endpoint, in a
    new revision per node. Returns how many were new. Call inside the poll's transaction.
    Locks: their nodes (node rows first, as everywhere in meshnet)."""
    fresh = list(
        RelayAllocation.objects.filter(
            relay=relay, job_peer_id__in=reported, bound_at__isnull=True
        ).values_list("pk", "job_peer__node_id")
    )
    if not fresh:
        return 0
    nodes = {node_pk for _, node_pk in fresh}
    _lock_nodes(nodes)
    # Compare-and-set: a concurrent poll may have marked some since the read.
    marked = RelayAllocation.objects.filter(
        pk__in=[pk for pk, _ in fresh], bound_at__isnull=True
    ).update(bound_at=now)
    if marked:
        for node_pk in sorted(nodes):
            signals.desired_state_changed.send(sender=RelayAllocation, node_pk=node_pk)
    return marked


def can_go_direct(allocation: RelayAllocation) -> bool:
    """Whether a relayed peer should try the direct path: the hub has seen the buyer's mapping
    (the only address the node can send to), and either its node no longer wants a relay
    (MOLT_RELAY_MODE, or an endpoint it declared since) or it was relayed only for being behind
    a NAT and MOLT_RELAY_TRY_DIRECT: a punch may well get through (the buyer public, or behind
    a NAT that lets the node's packets in), and nothing tells beforehand which NATs will (that
    needs the second hub address, docs/nat.md). Tried once per pair (`upgrade_failed_at`); the
    relay keeps the tunnel meanwhile. Pure on the loaded rows."""
    peer = allocation.job_peer
    if not peer.observed_endpoint:
        return False
    if not wants_relay(peer.node):
        return True
    return settings.MOLT_RELAY_MODE == "nat" and settings.MOLT_RELAY_TRY_DIRECT


def start_upgrades(relay: Relay, reported: dict[int, int], now, *, ready: set[int]) -> int:
    """Start the upgrade to direct of each of `relay`'s pairs that can go direct among the job
    peers `ready` (record_relay_poll: the relay reports the pair handshaken, and its byte count
    has not moved since the previous poll): the node's desired state names the buyer's mapping
    from the next revision (one per node), the pair stays open. Returns how many started. Call
    inside the poll's transaction. Locks: the nodes of the pairs that start (node rows first, as
    everywhere in meshnet).

    Only a quiet pair: WireGuard roams a peer to wherever its latest authenticated packet came
    from. The node sends to the buyer's mapping at once (clawnode.reconcile), and the buyer's
    client roams there; but a buyer packet still on its way through the relay then roamed the
    node back, the node's next packet went through the relay and roamed the buyer back too, and
    the try was over (the product matrix, 7 December: one of the two cells that can go direct
    stayed relayed, its upgrade started during the cell's 8 MB). A tunnel carrying traffic
    without a pause of a poll's length stays relayed.

    Only a handshaken pair: the direct try replaces the node's one endpoint for the buyer's
    peer, and a relay learns where the node is only from the node's own packets. Started before
    the relay heard the node (the node's first initiation can reach the relay before the relay
    bound the pair's ports, and the next comes 5 s later), the node sent only to the buyer's
    mapping, which a buyer's NAT that filters drops, while the relay dropped the buyer's packets
    for want of the node's address: no path at all until the give-up (the product matrix's
    relayed cells, 7 December). Once handshaken, the relay keeps forwarding the buyer's packets
    to the node during the try, and WireGuard roams the node back to the relay if the direct
    packets are dropped."""
    candidates = [
        allocation
        for allocation in RelayAllocation.objects.filter(
            relay=relay,
            job_peer_id__in=ready,
            upgrade_started_at__isnull=True,
            upgrade_failed_at__isnull=True,
            job_peer__state__in=[JobPeer.State.DESIRED, JobPeer.State.ACTIVE],
        )
        .exclude(job_peer__observed_endpoint="")
        .select_related("job_peer__node")
        if can_go_direct(allocation)
    ]
    if not candidates:
        return 0
    _lock_nodes({allocation.job_peer.node_id for allocation in candidates})
    nodes, started = set(), 0
    for allocation in candidates:
        peer = allocation.job_peer
        # Compare-and-set: a concurrent poll (or the peer's removal) may have won since the read.
        changed = RelayAllocation.objects.filter(
            pk=allocation.pk, upgrade_started_at__isnull=True
        ).update(
            upgrade_started_at=now,
            upgrade_relay_bytes=reported.get(peer.pk, 0),
            upgrade_relay_quiet_since=now,
            upgrade_peer_rx=peer.traffic_totals()[0],
        )
        if changed:
            started += 1
            nodes.add(peer.node_id)
    for node_pk in sorted(nodes):
        signals.desired_state_changed.send(sender=RelayAllocation, node_pk=node_pk)
    return started


def _lock_nodes(node_pks: set[int]) -> None:
    list(Node.objects.select_for_update().filter(pk__in=sorted(node_pks)).order_by("pk"))


def settle_upgrades(relay: Relay, reported: dict[int, int], now) -> dict[str, int]:
    """Follow each of `relay`'s upgrades under way on the bytes this poll reported:

    - the relay's count for the pair moved: the buyer still sends through the relay (so far);
      the quiet period restarts, with the node's rx from the buyer as its base;
    - it has not moved for UPGRADE_QUIET_SECONDS and the node received more from the buyer
      meanwhile: the buyer's packets reach the node another way, its client roamed to the
      node. The allocation is deleted (the path is direct; the relay drops the pair on this
      poll's answer; the node's state already names the buyer's mapping, so no revision);
    - UPGRADE_GIVE_UP_SECONDS after the start without that: the direct packets did not get
      through (or the node kept the relay); the upgrade is dropped, not to be tried again for
      this pair, and the node's side goes back to the relay (a revision).

    Quiet with nothing received is an idle tunnel (or a gone buyer): it proves nothing, and
    ends as given up. Returns the counts {"direct": n, "relayed": m} of pairs decided. Call
    inside the poll's transaction. Locks: the nodes of the pairs under way."""
    under_way = list(
        RelayAllocation.objects.filter(relay=relay, upgrade_started_at__isnull=False)
        .select_related("job_peer")
        .order_by("pk")
    )
    outcome = {DIRECT: 0, RELAYED: 0}
    if not under_way:
        return outcome
    _lock_nodes({allocation.job_peer.node_id for allocation in under_way})
    quiet_for = timedelta(seconds=UPGRADE_QUIET_SECONDS)
    give_up_at = timedelta(seconds=UPGRADE_GIVE_UP_SECONDS)
    back_to_relay = set()
    for allocation in under_way:
        peer = allocation.job_peer
        relay_bytes = reported.get(peer.pk)
        if relay_bytes is None:
            continue  # the relay did not report the pair this time: nothing to read
        rx = peer.traffic_totals()[0]
        # Compare-and-set on the start: a concurrent poll may have decided it since the read.
        this = RelayAllocation.objects.filter(
            pk=allocation.pk, upgrade_started_at=allocation.upgrade_started_at
        )
        quiet_since = allocation.upgrade_relay_quiet_since or allocation.upgrade_started_at
        if relay_bytes != allocation.upgrade_relay_bytes:
            # Any change counts as traffic: the kernel's count restarts when a side moves.
            this.update(
                upgrade_relay_bytes=relay_bytes, upgrade_relay_quiet_since=now, upgrade_peer_rx=rx
            )
        elif now - quiet_since >= quiet_for and rx > allocation.upgrade_peer_rx:
            if this.delete()[0]:
                outcome[DIRECT] += 1
            continue
        if now - allocation.upgrade_started_at >= give_up_at and this.update(
            upgrade_started_at=None,
            upgrade_relay_bytes=0,
            upgrade_relay_quiet_since=None,
            upgrade_peer_rx=0,
            upgrade_failed_at=now,
        ):
            back_to_relay.add(peer.node_id)
            outcome[RELAYED] += 1
    for node_pk in sorted(back_to_relay):
        signals.desired_state_changed.send(sender=RelayAllocation, node_pk=node_pk)
    return outcome


def _trim_status(status: dict) -> dict:
    """Only the numbers the ops pages show, whatever else a relay sends."""
    pairs = status.get("pairs") if isinstance(status, dict) else None
    if not isinstance(pairs, list):
        return {}
    kept = []
    for entry in pairs[:5000]:
        if not isinstance(entry, dict):
            continue
        kept.append(
            {
                "id": str(entry.get("id", ""))[:40],
                "handshaken": bool(entry.get("handshaken")),
                "fast_path": bool(entry.get("fast_path")),
                "bytes": _int(entry.get("forwarded_bytes")) + _int(entry.get("kernel_bytes")),
            }
        )
    return {"pairs": kept, "fast_path": bool(status.get("fast_path"))}


def _int(value) -> int:
    return value if isinstance(value, int) and value >= 0 else 0
