"""Sandbox names (docs/names.md): each sandbox of an order is ``<order>-<n>.molt``
(``order-17-0.molt``), resolvable by the order's own members only, through the names responder
of the agent on each node that runs one of its sandboxes (clawnode.names).

The table a node's responder answers from is signed like its desired state and rides in the
same frame (``names`` next to ``envelope``), at the same revision: a new kind, not a field of
DesiredState, so agents that predate names (which refuse unknown fields) keep working.

Groups are per order, not per node: every live sandbox of the order, on any node, is a record
and a client, and so is the buyer's tunnel address. A multi-node order's parts are orders of
their own (each sandbox named after its part's order: ``order-41-0.molt``, ``order-42-0.molt``)
but one group, their private network's (Sandbox.mesh_group, ``cluster:<id>``), so every part's
name resolves in every sandbox of the order, on every node of it, and for the buyer's one
tunnel. Reads only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from clawnode import wire
from django.db.models import Q
from django.utils import timezone

from meshnet.gateway_key import gateway_identity
from meshnet.models import Node, Sandbox

ZONE = "molt"
# "order:17" (a single-node order's one sandbox) or "order:17:2" (part 2 of a multi-node one)
_REF = re.compile(r"(?P<group>[a-z]+:[0-9]+)(?::(?P<part>[0-9]+))?")


def group_of(ref: str) -> tuple[str, int] | None:
    """(the order's ref, the sandbox's number in it) of a sandbox ref, or None for a ref that
    names no order's sandbox."""
    match = _REF.fullmatch(ref)
    if match is None:
        return None
    return match["group"], int(match["part"] or 0)


def sandbox_name(ref: str) -> str | None:
    """The DNS name of the sandbox with this ref: "order:17" -> "order-17-0.molt"."""
    parsed = group_of(ref)
    if parsed is None:
        return None
    group, part = parsed
    return f"{group.replace(':', '-')}-{part}.{ZONE}"


def name_groups(node: Node) -> tuple[wire.NameGroup, ...]:
    """One group per order with a live sandbox on ``node``: every live sandbox of that order
    (on any node) by name, resolvable by each of them and by the buyer's address."""
    return name_groups_of([node.pk])[node.pk]


def names_group(ref: str, mesh_group: str = "") -> str | None:
    """The names group of a sandbox: its private network's (a multi-node order's parts,
    "cluster:5") when it has one, else its order's ("order:17"); None for a ref that names no
    order's sandbox."""
    if mesh_group:
        return mesh_group
    parsed = group_of(ref)
    return parsed[0] if parsed is not None else None


def name_groups_of(node_pks: Sequence[int]) -> dict[int, tuple[wire.NameGroup, ...]]:
    """name_groups of each node (by pk) in two queries whatever their number: a push to every
    node signs every node's table (meshnet.tasks, issue 14)."""
    groups_of: dict[int, set[str]] = {pk: set() for pk in node_pks}
    on_nodes = Sandbox.objects.filter(node_id__in=node_pks, removed_revision__isnull=True)
    for node_pk, ref, mesh_group in on_nodes.values_list("node_id", "ref", "mesh_group"):
        if (group := names_group(ref, mesh_group)) is not None:
            groups_of[node_pk].add(group)
    every = sorted(set().union(*groups_of.values()))
    if not every:
        return {pk: () for pk in node_pks}
    match = Q(mesh_group__in=every)
    for group in every:
        match |= Q(ref=group) | Q(ref__startswith=f"{group}:")
    members: dict[str, list[tuple[str, str, str]]] = {group: [] for group in every}
    live = Sandbox.objects.filter(match, removed_revision__isnull=True).order_by("ref")
    rows = live.values_list("ref", "mesh_group", "address", "peer_address")
    for ref, mesh_group, address, peer_address in rows:
        group, name = names_group(ref, mesh_group), sandbox_name(ref)
        if group in members and name is not None:
            members[group].append((name, address, peer_address))
    built = {}
    for group in every:
        boxes = members[group]
        clients = dict.fromkeys([address for _, address, _ in boxes] + [p for *_, p in boxes])
        built[group] = wire.NameGroup(
            ref=group,
            clients=tuple(clients),
            records=tuple(
                wire.NameRecord(name=name, address=address) for name, address, _ in boxes
            ),
        )
    return {pk: tuple(built[group] for group in sorted(groups_of[pk])) for pk in node_pks}


def name_table(node: Node) -> wire.NameTable:
    return wire.NameTable(
        node_id=node.node_id,
        revision=node.desired_revision,
        groups=name_groups(node),
        issued_at=int(timezone.now().timestamp()),
    )


def signed_names(node: Node) -> dict[str, Any]:
    return wire.signed_envelope(wire.NAMES, name_table(node).to_dict(), gateway_identity())


def signed_names_of(nodes: Sequence[Node]) -> dict[int, dict[str, Any]]:
    """signed_names of each of ``nodes``, by pk (see name_groups_of)."""
    groups = name_groups_of([node.pk for node in nodes])
    issued_at = int(timezone.now().timestamp())
    return {
        node.pk: wire.signed_envelope(
            wire.NAMES,
            wire.NameTable(
                node_id=node.node_id,
                revision=node.desired_revision,
                groups=groups[node.pk],
                issued_at=issued_at,
            ).to_dict(),
            gateway_identity(),
        )
        for node in nodes
    }


def buyer_dns(node: Node, sandbox_address: str | None) -> tuple[str, ...]:
    """The wg-quick ``DNS =`` values for a buyer of a sandbox on ``node``: its responder (the
    node's mesh address) and the search domain, so ``ssh root@order-17-0`` works; nothing
    when the node's agent runs no responder (then the buyer's DNS is left alone)."""
    if sandbox_address is None or not node.names_responder:
        return ()
    return (node.mesh_address, ZONE)
