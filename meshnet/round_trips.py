"""Job peers' round trips: the node's pings of its buyers' tunnel addresses from its mesh
address (clawnode.rtt), stored on each job peer for the order API and the order page.

A ROUND_TRIPS report is taken whole or not at all: a bad signature, a malformed body, a stale
time, another node's id, or a peer that is not one of this node's (by key and ref) refuses it
with nothing written, in one transaction. Per peer, the newest measurement wins (a compare-and-
set on its time), so a replayed or reordered older report changes nothing.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from datetime import UTC, datetime

from clawnode import wire
from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from meshnet.models import JobPeer, Node

# The frame's type on the agent's socket; a gateway names it in its welcome's `accepts`.
FRAME = "round_trips"


class RoundTripsRefused(Exception):
    pass


def record_round_trips(node: Node, envelope: object) -> int:
    """Verify a ROUND_TRIPS message `node` signed and store each peer's round trip unless a
    newer one is stored. RoundTripsRefused (nothing written) as the module says. Returns how
    many peers were updated."""
    body = envelope.get("body") if isinstance(envelope, Mapping) else None
    try:
        wire.open_envelope(envelope, base64.b64decode(node.identity_public_key), wire.ROUND_TRIPS)
        report = wire.RoundTrips.from_dict(body if isinstance(body, Mapping) else {})
        wire.check_fresh(
            report.measured_at,
            int(timezone.now().timestamp()),
            max_skew=settings.MOLT_ENROLLMENT_MAX_SKEW_SECONDS,
        )
    except (wire.BadSignature, wire.ProtocolError, wire.StaleMessage) as exc:
        raise RoundTripsRefused(f"round trips refused: {exc}") from None
    if report.node_id != node.node_id:
        raise RoundTripsRefused("round trips refused: the report names another node")
    at = datetime.fromtimestamp(report.measured_at, tz=UTC)
    wanted = {(peer.public_key, peer.ref) for peer in report.peers}
    if len(wanted) != len(report.peers):
        raise RoundTripsRefused("round trips refused: a peer is named twice")
    refs = [ref for _, ref in wanted]
    with transaction.atomic():
        found = {
            (key, ref): pk
            for pk, key, ref in JobPeer.objects.filter(node=node, ref__in=refs).values_list(
                "pk", "public_key", "ref"
            )
        }
        for peer in report.peers:
            if (peer.public_key, peer.ref) not in found:
                raise RoundTripsRefused(
                    f"round trips refused: {peer.ref} with key {peer.public_key} is not a job "
                    f"peer of this node"
                )
        stored = 0
        for peer in report.peers:
            stored += (
                JobPeer.objects.filter(pk=found[(peer.public_key, peer.ref)])
                .filter(Q(rtt_measured_at__isnull=True) | Q(rtt_measured_at__lt=at))
                .update(rtt_measured_at=at, rtt_us=peer.rtt_us if peer.answered else None)
            )
        return stored
