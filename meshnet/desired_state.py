"""What a node's agent should have: its job peers and their sandboxes at the node's desired
revision, signed with the gateway key. Reads only; the writes that change it are in
meshnet.peers (and meshnet.sandboxes, which it calls)."""

from __future__ import annotations

from typing import Any

from clawnode import wire
from django.utils import timezone

from meshnet.gateway_key import gateway_identity
from meshnet.models import JobPeer, Node
from meshnet.sandboxes import live_specs


def desired_state(node: Node) -> wire.DesiredState:
    """The full set of peers and sandboxes `node` should have at its current desired revision
    (a sandbox until the revision that removes it, as its peer)."""
    peers = tuple(
        wire.PeerSpec(
            public_key=peer.public_key,
            allowed_ips=(f"{peer.address}/32",),
            kind="job",
            ref=peer.ref,
        )
        for peer in JobPeer.objects.filter(node=node).in_desired_state().order_by("id")
    )
    return wire.DesiredState(
        node_id=node.node_id,
        revision=node.desired_revision,
        peers=peers,
        issued_at=int(timezone.now().timestamp()),
        sandboxes=live_specs(node),
    )


def signed_desired_state(node: Node) -> dict[str, Any]:
    return wire.signed_envelope(
        wire.DESIRED_STATE, desired_state(node).to_dict(), gateway_identity()
    )
