"""What a node's agent should have: its job peers and their sandboxes at the node's desired
revision, its node-to-node peers to the other nodes of its multi-node orders (meshnet.mesh), and
the gateway's hub as a peer when one is configured (meshnet.hub), signed with the gateway key.
Reads only; the writes that change it are in meshnet.peers (and meshnet.sandboxes, which it
calls)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from clawnode import wire
from django.utils import timezone

from meshnet.gateway_key import gateway_identity
from meshnet.hub import hub_peer
from meshnet.mesh import mesh_peers_of
from meshnet.models import JobPeer, Node
from meshnet.relays import allocation_of
from meshnet.sandboxes import live_specs_of

# The node's keepalive toward a buyer whose mapping is known: below every common NAT's UDP
# timeout, as the buyer's own (meshnet.wgconfig) and the hub's.
PUNCH_KEEPALIVE_SECONDS = 25


def desired_state(node: Node) -> wire.DesiredState:
    """The full set of peers and sandboxes `node` should have at its current desired revision
    (a sandbox until the revision that removes it, as its peer)."""
    return desired_states([node])[node.pk]


def desired_states(nodes: Sequence[Node]) -> dict[int, wire.DesiredState]:
    """desired_state of each of `nodes` (by pk), in seven queries at most whatever their number:
    a change that touches every node computes them all before its push, where a query or two
    per node made the push of 1,000 nodes wait seconds (issue 14)."""
    pks = [node.pk for node in nodes]
    peers: dict[int, list[wire.PeerSpec]] = {pk: [] for pk in pks}
    for peer in (
        JobPeer.objects.filter(node_id__in=pks)
        .in_desired_state()
        .select_related("relay_allocation__relay")
        .order_by("id")
    ):
        # A relayed peer (meshnet.relays): the node sends to its port of the relay, which
        # forwards to wherever the buyer's client sends from.
        sends_to = _node_sends_to(peer)
        peers[peer.node_id].append(
            wire.PeerSpec(
                public_key=peer.public_key,
                allowed_ips=(f"{peer.address}/32",),
                kind="job",
                ref=peer.ref,
                # Coordinated punching (docs/nat.md): once the hub has seen the buyer's mapping,
                # the node sends toward it (with keepalive) while the buyer's client sends toward
                # the node, so each side's NAT opens for the other. Before that, no endpoint:
                # WireGuard learns the buyer's from its handshakes. The agent never moves the
                # endpoint of a peer with a recent handshake (clawnode.reconcile.plan).
                endpoint=sends_to,
                persistent_keepalive=PUNCH_KEEPALIVE_SECONDS if sends_to else 0,
            )
        )
    # The same for every node and every revision: a node that connects gets it with the state
    # sent on connect, so turning the hub on needs no revision bump.
    hub = hub_peer()
    sandboxes = live_specs_of(pks)
    for pk, mesh in mesh_peers_of(pks).items():
        peers[pk].extend(mesh)
    issued_at = int(timezone.now().timestamp())
    return {
        node.pk: wire.DesiredState(
            node_id=node.node_id,
            revision=node.desired_revision,
            peers=(*peers[node.pk], hub) if hub is not None else tuple(peers[node.pk]),
            issued_at=issued_at,
            sandboxes=sandboxes[node.pk],
        )
        for node in nodes
    }


def _node_sends_to(peer: JobPeer) -> str:
    allocation = allocation_of(peer)
    if allocation is None or (allocation.upgrade_started_at and peer.observed_endpoint):
        # Direct, or relayed with an upgrade to direct under way (meshnet.relays): the buyer's
        # mapping. The pair stays open, so a buyer that does not roam keeps the relay.
        return peer.observed_endpoint
    if allocation.bound_at is None:
        # The relay has not bound the pair's ports yet: a packet sent there now is lost. No
        # endpoint and no keepalive until it has (RelayAllocation.bound_at); turning keepalive
        # on then makes WireGuard send its first initiation at once.
        return ""
    return allocation.provider_endpoint


def signed_desired_state(node: Node) -> dict[str, Any]:
    return _sign(desired_state(node))


def signed_desired_states(nodes: Sequence[Node]) -> dict[int, dict[str, Any]]:
    """signed_desired_state of each of `nodes`, by pk (see desired_states)."""
    return {pk: _sign(state) for pk, state in desired_states(nodes).items()}


def _sign(state: wire.DesiredState) -> dict[str, Any]:
    return wire.signed_envelope(wire.DESIRED_STATE, state.to_dict(), gateway_identity())
