"""The buyer's one tunnel to a multi-node order (issue 16): one wg-quick file with one
[Interface] (the buyer's one tunnel address, the same on every part's node) and one [Peer] per
node, whose allowed IPs are that node's sandbox addresses of the order.

Every part's node has the buyer's one key (Cluster.wireguard_public_key) as the job's peer, in
one key group (meshnet.key_claims: the database lets a key be live on several peers only when
they are one group's), so the parts' peers share one address and the file needs no peer twice.
A relayed part's [Peer] sends to its relay (meshnet.relays.buyer_endpoint), as a single
order's file does. Reads only.
"""

from __future__ import annotations

from marketplace.cluster_models import Cluster
from marketplace.errors import InvalidTransition
from marketplace.models import Order
from marketplace.orders import cluster_key_group
from meshnet.hub import buyer_hub_peer
from meshnet.models import JobPeer, Sandbox
from meshnet.names import buyer_dns, sandbox_name
from meshnet.relays import buyer_endpoint
from meshnet.wgconfig import NodePeer, group_buyer_config

S = Order.State


class TunnelNotReady(InvalidTransition):
    """409: no part has its tunnel yet, every part ended, or the order predates one tunnel."""


def cluster_config(cluster: Cluster, *, dns_active: bool = False) -> str:
    """The cluster's wg-quick file, complete but for the PrivateKey. The parts provisioning or
    running that have their peer are in it; a part not yet provisioned is named in a comment
    (download again once it runs), an ended or stopping part is left out (its node drops the
    peer). TunnelNotReady when there is nothing to reach.

    With a part whose node runs the names responder, a DNS line naming the first such node's
    (it answers every part's name: meshnet.names groups a multi-node order's sandboxes), its
    address routed to that node too, commented unless `dns_active`, and each part's name in
    the comment."""
    parts = list(
        Order.objects.filter(cluster=cluster)
        .select_related("listing__node", "job_peer__node", "job_peer__relay_allocation__relay")
        .order_by("part_index")
    )
    live = [p for p in parts if p.state in (S.PROVISIONING, S.RUNNING) and p.job_peer_id]
    waiting = [
        p
        for p in parts
        if p.state == S.PENDING or (p.state == S.PROVISIONING and not p.job_peer_id)
    ]
    if not live:
        if waiting:
            raise TunnelNotReady(
                f"multi-node order {cluster.pk} is not provisioned yet: its tunnel address is "
                "being allocated; retry in a few seconds"
            )
        raise TunnelNotReady(
            f"multi-node order {cluster.pk} has no part running: its tunnel is being removed"
        )
    group = cluster_key_group(cluster.pk)
    peers: list[JobPeer] = [p.job_peer for p in live]
    if any(peer.key_group != group for peer in peers):
        raise TunnelNotReady(
            f"multi-node order {cluster.pk} was placed with a key per part: use each part's "
            "/api/v1/orders/{id}/wireguard.conf"
        )
    sandboxes = dict(
        Sandbox.objects.filter(ref__in=[peer.ref for peer in peers]).values_list("ref", "address")
    )
    dns: tuple[str, ...] = ()
    resolver: Order | None = None
    for part in live:
        dns = buyer_dns(part.job_peer.node, sandboxes.get(part.job_peer.ref))
        if dns:
            resolver = part
            break
    nodes = []
    for part in live:
        node = part.job_peer.node
        address = str(sandboxes.get(part.job_peer.ref) or node.mesh_address)
        name = sandbox_name(part.job_peer.ref) if part.job_peer.ref in sandboxes else None
        nodes.append(
            NodePeer(
                public_key=node.wireguard_public_key,
                endpoint=buyer_endpoint(part.job_peer),
                # The responder's address too, on its node's peer only: that node lets the
                # buyer reach nothing of it but port 53.
                addresses=(address, dns[0]) if part is resolver else (address,),
                label=f"part {part.part_index} ({part.gpu_count}x {part.listing.gpu_model}) "
                f"on {node.name}" + (f", {name.removesuffix('.molt')}" if name and dns else ""),
            )
        )
    label = f"multi-node order {cluster.pk} ({len(parts)} parts)"
    if dns:
        label += "\nNames (ssh root@<name>) with the DNS line" + (
            "" if dns_active else " uncommented (wg-quick needs resolvconf for it)"
        )
    if waiting:
        label += "\nNot provisioned yet (download again once they run): " + ", ".join(
            f"part {p.part_index}" for p in waiting
        )
    return group_buyer_config(
        job_address=str(peers[0].address),
        nodes=tuple(nodes),
        order_label=label,
        hub=buyer_hub_peer(),
        dns=dns,
        dns_active=dns_active,
    )
