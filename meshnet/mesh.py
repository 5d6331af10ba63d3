"""The job's private network (issue 16): the sandboxes of one multi-node order reach each other
over WireGuard between their nodes, and nothing else does (docs/network.md).

A group is the sandboxes that share a Sandbox.mesh_group ("cluster:<id>", set by marketplace
for the parts of a multi-node order). Node-to-node peers are job-scoped and derived, never
stored: a node's desired state has one peer of kind "mesh" per other node that holds a live
sandbox of a group it holds one of too, routing exactly those sandboxes' /32s. Several groups
across the same two nodes make one peer (WireGuard has one peer per public key) routing the
union; each sandbox's spec lists its own group's members (wire.SandboxSpec.mesh), from which
the agent's firewall allows (sandbox, member) pairs only, and against which the agent checks
every address a node-to-node peer routes (clawnode.job_peers.check_mesh_peers).

So a peer appears in the revision that adds the second node's sandbox of a group and goes in
the revision that removes the last one: every change to a group's membership bumps the desired
revision of the group's other nodes (bump_members), each pushed signed and acknowledged like
any revision. Nodes outside the group are not touched.

Reads only, except bump_members/bump_peers_of, which go through meshnet.signals (meshnet.peers
bumps and pushes) so that this module imports no write path.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Iterable

from clawnode import wire

from meshnet import signals
from meshnet.models import Node, Sandbox

MESH_REF_PREFIX = "node:"  # a node-to-node peer's ref: "node:<the other node's node_id>"
# Both nodes send keepalives to each other's endpoint, so each side's NAT opens for the other
# and stays open (coordinated punching, docs/nat.md), as a node does toward a buyer.
MESH_KEEPALIVE_SECONDS = 25


def cluster_group(cluster_id: int) -> str:
    """The mesh group of the parts of multi-node order `cluster_id`."""
    return f"cluster:{cluster_id}"


def _live_members() -> Iterable[Sandbox]:
    return Sandbox.objects.filter(removed_revision__isnull=True, node__revoked_at__isnull=True)


def members_of_groups(groups: Iterable[str]) -> dict[str, list[tuple[int, str]]]:
    """{group: [(node pk, sandbox address)]} of every live sandbox of `groups` on a node not
    revoked, in id order. One query."""
    wanted = sorted({group for group in groups if group})
    found: dict[str, list[tuple[int, str]]] = defaultdict(list)
    if not wanted:
        return found
    rows = (
        _live_members()
        .filter(mesh_group__in=wanted)
        .order_by("id")
        .values_list("mesh_group", "node_id", "address")
    )
    for group, node_pk, address in rows:
        found[group].append((node_pk, str(address)))
    return found


def mesh_peers_of(node_pks: Iterable[int]) -> dict[int, list[wire.PeerSpec]]:
    """The node-to-node peers of each of `node_pks` (by pk), sorted by ref: one per other node
    sharing a group, its AllowedIPs the /32s of that node's sandboxes in the groups shared.
    Three queries whatever the number of nodes."""
    pks = list(node_pks)
    peers: dict[int, list[wire.PeerSpec]] = {pk: [] for pk in pks}
    local = (
        _live_members()
        .filter(node_id__in=pks)
        .exclude(mesh_group="")
        .values_list("node_id", "mesh_group")
    )
    groups_of: dict[int, set[str]] = defaultdict(set)
    for node_pk, group in local:
        groups_of[node_pk].add(group)
    members = members_of_groups(g for groups in groups_of.values() for g in groups)
    remote_pks = {node_pk for found in members.values() for node_pk, _ in found}
    nodes = {node.pk: node for node in Node.objects.filter(pk__in=remote_pks)}
    for pk, groups in groups_of.items():
        routes: dict[int, set[str]] = defaultdict(set)
        for group in groups:
            for node_pk, address in members[group]:
                if node_pk != pk:
                    routes[node_pk].add(address)
        for node_pk, addresses in routes.items():
            node = nodes[node_pk]
            endpoint = node.endpoint
            peers[pk].append(
                wire.PeerSpec(
                    public_key=node.wireguard_public_key,
                    allowed_ips=tuple(
                        f"{a}/32" for a in sorted(addresses, key=ipaddress.IPv4Address)
                    ),
                    kind="mesh",
                    ref=f"{MESH_REF_PREFIX}{node.node_id}",
                    endpoint=endpoint,
                    persistent_keepalive=MESH_KEEPALIVE_SECONDS if endpoint else 0,
                )
            )
        peers[pk].sort(key=lambda peer: peer.ref)
    return peers


def bump_members(group: str, *, besides: int) -> list[int]:
    """A sandbox of `group` on node `besides` was added or dropped from desired state: every
    other node holding a live sandbox of the group gets a new desired revision, pushed after
    commit (its node-to-node peer to `besides` changes). Returns their pks, in order. Call
    inside the writing transaction; the revisions are bumped in primary-key order. Callers lock
    the rows of the group's nodes first, in primary-key order (marketplace does, for every
    change to a part of a multi-node order), so two parts placed at once on two nodes wait for
    each other: the second to commit sees the first and bumps its node."""
    if not group:
        return []
    pks = sorted({node_pk for node_pk, _ in members_of_groups([group])[group]} - {besides})
    for pk in pks:
        signals.desired_state_changed.send(sender=Sandbox, node_pk=pk)
    return pks


def bump_peers_of(node_pk: int) -> list[int]:
    """Node `node_pk`'s endpoint changed: every other node sharing a live group with it gets a
    new desired revision (its node-to-node peer's endpoint follows). Call inside the writing
    transaction."""
    groups = (
        _live_members().filter(node_id=node_pk).exclude(mesh_group="").values_list("mesh_group")
    )
    found = members_of_groups(group for (group,) in groups)
    pks = sorted({pk for members in found.values() for pk, _ in members} - {node_pk})
    for pk in pks:
        signals.desired_state_changed.send(sender=Sandbox, node_pk=pk)
    return pks
