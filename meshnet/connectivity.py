"""Nodes' connectivity reports: what the agent's check of its paths over the mesh found
(clawnode.connectivity: a WireGuard handshake with the gateway's hub, and a peer node's once
node-to-node peers exist), stored on the node for the provider's pages and the API.

Locks: none beyond the one UPDATE, a compare-and-set on the check time, so a replayed or
reordered older report changes nothing.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from clawnode import wire
from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from meshnet.models import Node

# Frames a gateway takes besides the ones every agent sends: named in the welcome, so an agent
# sends an optional one only to a gateway that knows it (an unknown type closes the channel).
# "round_trips": the job peers' round trips (meshnet.round_trips).
ACCEPTS = ("connectivity", "round_trips")


class ConnectivityRefused(Exception):
    pass


def record_connectivity(node: Node, envelope: object) -> bool:
    """Verify a CONNECTIVITY message `node` signed and store it unless a newer check is stored.
    ConnectivityRefused (nothing written) when the signature is not the node's, the body is
    malformed, names another node, or its time is off by more than the enrolment skew. True
    when stored."""
    body = envelope.get("body") if isinstance(envelope, Mapping) else None
    try:
        wire.open_envelope(envelope, base64.b64decode(node.identity_public_key), wire.CONNECTIVITY)
        report = wire.Connectivity.from_dict(body if isinstance(body, Mapping) else {})
        wire.check_fresh(
            report.checked_at,
            int(timezone.now().timestamp()),
            max_skew=settings.MOLT_ENROLLMENT_MAX_SKEW_SECONDS,
        )
    except (wire.BadSignature, wire.ProtocolError, wire.StaleMessage) as exc:
        raise ConnectivityRefused(f"connectivity report refused: {exc}") from None
    if report.node_id != node.node_id:
        raise ConnectivityRefused("connectivity report names another node")
    at = datetime.fromtimestamp(report.checked_at, tz=UTC)
    return bool(
        Node.objects.filter(pk=node.pk)
        .filter(Q(connectivity_checked_at__isnull=True) | Q(connectivity_checked_at__lt=at))
        .update(**_fields(report, at))
    )


def _fields(report: wire.Connectivity, at: datetime) -> dict[str, Any]:
    return {
        "connectivity_checked_at": at,
        "hub_path": report.hub,
        "hub_rtt_ms": report.hub_rtt_ms if report.hub == "reachable" else None,
        "peer_path": report.peer,
        "peer_path_node": report.peer_node_id,
        "peer_rtt_ms": report.peer_rtt_ms if report.peer == "reachable" else None,
        "connectivity_detail": report.detail,
    }
