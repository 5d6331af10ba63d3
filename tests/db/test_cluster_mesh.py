"""The job's private network (meshnet.mesh): the gateway gives the nodes of a multi-node order
node-to-node peers routing exactly the order's sandboxes, in the revision that places the second
part, and takes them away in the revision that ends one; every change touches only the nodes of
that order. Through the real services (place, provision, stop, revoke, the hub's observations),
reading each node's signed desired state as its agent would and checking it as the agent does
(clawnode.job_peers.check_mesh_peers). Real packets: tests/netns/test_cluster_mesh.py."""

from __future__ import annotations

import pytest
from clawnode import wire
from clawnode.job_peers import check_mesh_peers
from clawnode.send_order import sends_second

from marketplace.clusters import PartSpec, parts_of, place_cluster, stop_cluster
from marketplace.orders import place_order, provision_order, stop_order
from meshnet.desired_state import desired_state
from meshnet.hub import record_endpoints
from meshnet.models import Node, Sandbox
from meshnet.nodes import revoke_node
from tests import factories

pytestmark = [pytest.mark.db, pytest.mark.django_db]


@pytest.fixture
def nodes(provider, carol):
    """Node A (bob's), node B (carol's, another region), node C (bob's, in no order of ours)."""
    a = factories.enrolled_node(provider, gpus=[factories.gpu(i) for i in range(4)])
    b = factories.enrolled_node(carol, gpus=[factories.gpu(i) for i in range(4)], region="us-east")
    c = factories.enrolled_node(provider, gpus=[factories.gpu(i) for i in range(4)])
    return a, b, c


@pytest.fixture
def listings(provider, carol, nodes):
    a, b, c = nodes
    return (
        factories.sandbox_listing(provider, a, gpu_count=4),
        factories.sandbox_listing(carol, b, gpu_count=4),
        factories.sandbox_listing(provider, c, gpu_count=4),
    )


@pytest.fixture
def buyer_keys(funded_buyer):
    factories.ssh_key(funded_buyer)
    return funded_buyer


def place(buyer, *listings):
    return place_cluster(
        buyer,
        parts=[PartSpec(listing=listing.pk, gpu_count=1) for listing in listings],
        hours=1,
        on_part_loss="degrade",
        wireguard_public_key=factories.wg_public_key(),
    )


def state(node) -> wire.DesiredState:
    """The node's desired state as its agent parses and checks it."""
    node.refresh_from_db()
    parsed = wire.DesiredState.from_dict(desired_state(node).to_dict())
    check_mesh_peers(parsed)
    return parsed


def mesh_peers(node) -> dict[str, tuple[str, ...]]:
    return {p.ref: p.allowed_ips for p in state(node).peers if p.kind == "mesh" and p.ref != "hub"}


def address(order) -> str:
    return f"{Sandbox.objects.get(ref=f'order:{order.pk}').address}/32"


def revision(node) -> int:
    return Node.objects.values_list("desired_revision", flat=True).get(pk=node.pk)


def members(node) -> dict[str, tuple[str, ...]]:
    return {box.ref: box.mesh for box in state(node).sandboxes}


def test_the_peers_come_when_both_parts_are_placed_and_only_to_the_orders_nodes(
    buyer_keys, nodes, listings
):
    a, b, c = nodes
    cluster = place(buyer_keys, listings[0], listings[1])
    part_a, part_b = parts_of(cluster)
    before_b, before_c = revision(b), revision(c)
    provision_order(part_a.pk)
    # One part placed: nothing to peer with yet, and no other node's state changed
    assert mesh_peers(a) == {}
    assert members(a) == {f"order:{part_a.pk}": ()}
    assert (revision(b), revision(c)) == (before_b, before_c)

    before_a = revision(a)
    provision_order(part_b.pk)
    # The second part's revision on B, and a new revision on A: each has a peer to the other,
    # routing exactly the order's sandbox there
    assert revision(a) == before_a + 1
    assert revision(c) == before_c
    assert mesh_peers(a) == {f"node:{b.node_id}": (address(part_b),)}
    assert mesh_peers(b) == {f"node:{a.node_id}": (address(part_a),)}
    assert members(a) == {f"order:{part_a.pk}": (address(part_b),)}
    assert members(b) == {f"order:{part_b.pk}": (address(part_a),)}
    (peer,) = (p for p in state(a).peers if p.ref == f"node:{b.node_id}")
    b.refresh_from_db()
    assert (peer.public_key, peer.endpoint) == (b.wireguard_public_key, b.endpoint)
    assert peer.persistent_keepalive > 0
    # The two agents agree, each from its own state, which of them sends first (the ref is
    # what clawnode.send_order reads): exactly one waits
    (back,) = (p for p in state(b).peers if p.ref == f"node:{a.node_id}")
    assert sends_second(state(a), peer) != sends_second(state(b), back)
    assert mesh_peers(c) == {}


def test_two_orders_across_the_same_nodes_share_one_peer_and_each_sandbox_lists_its_own(
    buyer_keys, nodes, listings
):
    a, b, c = nodes
    first = place(buyer_keys, listings[0], listings[1])
    second = place(buyer_keys, listings[0], listings[1])
    for part in [*parts_of(first), *parts_of(second)]:
        provision_order(part.pk)
    a1, b1 = parts_of(first)
    a2, b2 = parts_of(second)
    # A single-node order on A is no member of anything
    single = place_order(
        buyer_keys, listing_id=listings[0].pk, gpu_count=1, hours=1,
        wireguard_public_key=factories.wg_public_key(),
    )  # fmt: skip
    provision_order(single.pk)
    # WireGuard has one peer per key: one peer to B, routing both orders' sandboxes there
    assert mesh_peers(a) == {f"node:{b.node_id}": tuple(sorted([address(b1), address(b2)]))}
    assert members(a) == {
        f"order:{a1.pk}": (address(b1),),
        f"order:{a2.pk}": (address(b2),),
        f"order:{single.pk}": (),
    }
    # A third order adding C: A's peer to B unchanged, a peer to C beside it
    third = place(buyer_keys, listings[0], listings[2])
    for part in parts_of(third):
        provision_order(part.pk)
    _, c3 = parts_of(third)
    assert mesh_peers(a) == {
        f"node:{b.node_id}": tuple(sorted([address(b1), address(b2)])),
        f"node:{c.node_id}": (address(c3),),
    }
    assert mesh_peers(b) == {f"node:{a.node_id}": tuple(sorted([address(a1), address(a2)]))}


def test_stop_takes_the_peers_away_in_a_new_revision_of_the_orders_nodes_only(
    buyer_keys, nodes, listings
):
    a, b, c = nodes
    other = place(buyer_keys, listings[0], listings[2])
    cluster = place(buyer_keys, listings[0], listings[1])
    for part in [*parts_of(other), *parts_of(cluster)]:
        provision_order(part.pk)
    revisions = {n.pk: revision(n) for n in nodes}
    stop_cluster(cluster)
    assert revision(a) > revisions[a.pk] and revision(b) > revisions[b.pk]
    assert revision(c) == revisions[c.pk]
    assert mesh_peers(b) == {}
    other_c = parts_of(other)[1]
    assert mesh_peers(a) == {f"node:{c.node_id}": (address(other_c),)}


def test_a_part_ended_on_its_own_leaves_the_others_peers_to_its_node(buyer_keys, nodes, listings):
    a, b, c = nodes
    cluster = place(buyer_keys, listings[0], listings[1], listings[2])
    for part in parts_of(cluster):
        provision_order(part.pk)
    part_a, part_b, part_c = parts_of(cluster)
    assert set(mesh_peers(b)) == {f"node:{a.node_id}", f"node:{c.node_id}"}
    revisions = {n.pk: revision(n) for n in nodes}
    stop_order(part_c)
    # The others' nodes get a new revision without it, signed and pushed as any
    assert revision(a) > revisions[a.pk] and revision(b) > revisions[b.pk]
    assert mesh_peers(b) == {f"node:{a.node_id}": (address(part_a),)}
    assert mesh_peers(c) == {}
    assert members(a) == {f"order:{part_a.pk}": (address(part_b),)}


def test_a_revoked_nodes_sandboxes_leave_the_other_nodes_peers(buyer_keys, nodes, listings):
    a, b, c = nodes
    cluster = place(buyer_keys, listings[0], listings[1], listings[2])
    for part in parts_of(cluster):
        provision_order(part.pk)
    _, part_b, _ = parts_of(cluster)
    before = revision(a)
    revoke_node(Node.objects.get(pk=c.pk))
    assert revision(a) > before
    assert mesh_peers(a) == {f"node:{b.node_id}": (address(part_b),)}


def test_a_nodes_new_mapping_seen_by_the_hub_reaches_the_nodes_that_peer_with_it(
    buyer_keys, nodes, listings
):
    a, b, c = nodes
    cluster = place(buyer_keys, listings[0], listings[1])
    for part in parts_of(cluster):
        provision_order(part.pk)
    b.refresh_from_db()
    assert not b.declared_endpoint
    revisions = {n.pk: revision(n) for n in nodes}
    record_endpoints({b.wireguard_public_key: "198.51.100.77:40001"})
    assert revision(a) == revisions[a.pk] + 1
    assert (revision(b), revision(c)) == (revisions[b.pk], revisions[c.pk])
    (peer,) = (p for p in state(a).peers if p.ref == f"node:{b.node_id}")
    assert peer.endpoint == "198.51.100.77:40001"
