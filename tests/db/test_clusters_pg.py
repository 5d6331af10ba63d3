"""Multi-node orders under real concurrency, on PostgreSQL (threads, a connection each):

- the last two parts of a cluster ending at the same moment on two nodes (their removal acks
  racing) resolve the one hold exactly once, whichever commits second;
- orders taking the same two listings in opposite orders neither deadlock nor oversell;
- stop of the whole cluster racing a part's own stop moves each part once.

The audit after each."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from marketplace import ledger
from marketplace.audit import audit_ledger
from marketplace.clusters import PartSpec, parts_of, place_cluster, state_of, stop_cluster
from marketplace.errors import InvalidTransition, Oversold
from marketplace.listings import create_listing
from marketplace.models import EscrowHold, LedgerTransaction, Order
from marketplace.orders import provision_order, stop_order
from meshnet.agent_channel import acknowledge_revision
from meshnet.models import Node
from tests import factories
from tests.db.test_concurrency_pg import in_threads
from tests.factories import USD

pytestmark = [pytest.mark.db, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def two_nodes(provider, carol):
    a = factories.enrolled_node(provider, gpus=[factories.gpu(i) for i in range(8)])
    b = factories.enrolled_node(carol, gpus=[factories.gpu(i) for i in range(8)], region="us-east")
    la = create_listing(provider, node=a, gpu_count=8, price_per_gpu_hour=USD, price_per_gib=1)
    lb = create_listing(carol, node=b, gpu_count=8, price_per_gpu_hour=USD, price_per_gib=1)
    return (a, la), (b, lb)


def ack(node, at=None) -> None:
    node = Node.objects.get(pk=node.pk)
    acknowledge_revision(node, node.desired_revision, at=at or timezone.now())


def spec(listing, gpus=1) -> PartSpec:
    return PartSpec(listing.pk, gpus)


def test_two_parts_ending_at_once_resolve_the_one_hold_exactly_once(funded_buyer, two_nodes):
    (node_a, la), (node_b, lb) = two_nodes
    for _ in range(5):
        cluster = place_cluster(
            funded_buyer,
            parts=[spec(la), spec(lb)],
            hours=1,
            on_part_loss="end",
            wireguard_public_key=factories.wg_public_key(),
        )
        for part in parts_of(cluster):
            provision_order(part.pk)
        started = timezone.now() - timedelta(minutes=10)
        ack(node_a, at=started)
        ack(node_b, at=started)
        assert state_of(cluster) == "running"
        stop_cluster(cluster)
        in_threads(2, lambda i: ack((node_a, node_b)[i]))  # both removals at once
        assert [p.state for p in parts_of(cluster)] == ["completed", "completed"]
        hold = EscrowHold.objects.select_related("account").get(cluster=cluster)
        assert (hold.state, hold.account.balance) == ("captured", 0)
        assert LedgerTransaction.objects.filter(resolves_hold=hold).count() == 1
        assert audit_ledger() == []
    assert ledger.held_for(funded_buyer) == 0


def test_orders_over_the_same_listings_in_opposite_orders_neither_deadlock_nor_oversell(
    make_user, two_nodes
):
    (_, la), (_, lb) = two_nodes
    buyers = [make_user(f"buyer{i}") for i in range(12)]
    for b in buyers:
        ledger.grant_credits(b, 1000 * USD)

    def order(i: int) -> str:
        parts = [spec(la), spec(lb)] if i % 2 else [spec(lb), spec(la)]
        try:
            place_cluster(
                buyers[i],
                parts=parts,
                hours=1,
                on_part_loss="degrade",
                wireguard_public_key=factories.wg_public_key(),
            )
        except Oversold:
            return "oversold"
        return "placed"

    outcomes = in_threads(12, order)
    assert outcomes.count("placed") == 8 and outcomes.count("oversold") == 4
    for listing in (la, lb):
        assert Order.objects.gpus_in_use(listing.pk) == 8
    assert audit_ledger() == []


def test_stopping_the_cluster_racing_a_parts_own_stop_moves_each_part_once(funded_buyer, two_nodes):
    (_, la), (_, lb) = two_nodes
    for _ in range(5):
        cluster = place_cluster(
            funded_buyer,
            parts=[spec(la), spec(lb)],
            hours=1,
            on_part_loss="end",
            wireguard_public_key=factories.wg_public_key(),
        )
        first = parts_of(cluster)[0]

        def stop(i: int, cluster=cluster, first=first) -> str:
            try:
                stop_cluster(cluster) if i == 0 else stop_order(first)
            except InvalidTransition:
                return "refused"
            return "stopped"

        outcomes = in_threads(2, stop)
        # The cluster's stop always has a part to stop (the second); the part's own stop is
        # refused when the cluster's came first. Either way each part was cancelled once.
        assert outcomes[0] == "stopped"
        assert [p.state for p in parts_of(cluster)] == ["cancelled", "cancelled"]
        assert all(p.transitions.count() == 2 for p in parts_of(cluster))
        hold = EscrowHold.objects.get(cluster=cluster)
        assert hold.state == "released"
        assert audit_ledger() == []


def test_two_parts_provisioned_at_once_each_see_the_other_no_revision_lost(
    funded_buyer, provider, carol
):
    """The job's private network (meshnet.mesh): the parts' sandboxes placed at the same moment
    on two nodes. The second to commit sees the first's sandbox and bumps that node's revision:
    a node whose state gained a peer always has a revision after it (a lost bump would leave
    the first node acknowledged at a revision without its peer to the second, until some
    unrelated change). Neither deadlocks. (Provisioning also serializes on the jobs pool's
    row; the parts' nodes locked together, marketplace.orders._lock_node_then_order, are what
    serialize a part's removal against another's placement.)"""
    from meshnet.desired_state import desired_state
    from meshnet.models import Sandbox

    factories.ssh_key(funded_buyer)
    a = factories.enrolled_node(provider, gpus=[factories.gpu(i) for i in range(8)])
    b = factories.enrolled_node(carol, gpus=[factories.gpu(i) for i in range(8)], region="us-east")
    la = factories.sandbox_listing(provider, a, gpu_count=8)
    lb = factories.sandbox_listing(carol, b, gpu_count=8)
    for _ in range(5):
        cluster = place_cluster(
            funded_buyer,
            parts=[spec(la), spec(lb)],
            hours=1,
            on_part_loss="degrade",
            wireguard_public_key=factories.wg_public_key(),
        )
        parts = parts_of(cluster)
        ids = [part.pk for part in parts]
        in_threads(2, lambda i, ids=ids: provision_order(ids[i]))
        boxes = [Sandbox.objects.get(ref=f"order:{part.pk}") for part in parts]
        nodes = [Node.objects.get(pk=n.pk) for n in (a, b)]
        # One of the two was added first; the other's add bumped its node after it
        pairs = zip(nodes, boxes, strict=True)
        assert any(n.desired_revision > box.added_revision for n, box in pairs)
        for node, other in ((nodes[0], boxes[1]), (nodes[1], boxes[0])):
            routed = {
                ip for p in desired_state(node).peers if p.ref.startswith("node:")
                for ip in p.allowed_ips
            }  # fmt: skip
            assert f"{other.address}/32" in routed


def test_parts_provisioned_at_once_share_the_one_key_and_address_and_another_job_never_gets_it(
    funded_buyer, make_user, two_nodes
):
    """Two parts' provisioning racing (each on its own node) both create the key's claim: the
    loser reads the winner's and joins the group. A single order's peer racing a cluster's
    parts for the same key: exactly one group gets it."""
    from meshnet.errors import PeerKeyInUse
    from meshnet.models import JobPeer, PeerKeyClaim
    from meshnet.peers import create_job_peer

    (node_a, la), (node_b, lb) = two_nodes
    for _ in range(5):
        key = factories.wg_public_key()
        cluster = place_cluster(
            funded_buyer,
            parts=[spec(la), spec(lb)],
            hours=1,
            on_part_loss="degrade",
            wireguard_public_key=key,
        )
        parts = parts_of(cluster)
        in_threads(2, lambda i, parts=parts: provision_order(parts[i].pk))
        assert [p.state for p in parts_of(cluster)] == ["provisioning", "provisioning"]
        peers = JobPeer.objects.filter(public_key=key)
        assert peers.count() == 2 and len({p.address for p in peers}) == 1
        assert PeerKeyClaim.objects.get(public_key=key).group == f"cluster:{cluster.pk}"
        stop_cluster(cluster)
        ack(node_a)
        ack(node_b)

        key = factories.wg_public_key()
        nodes = (Node.objects.get(pk=node_a.pk), Node.objects.get(pk=node_b.pk))

        def add(i: int, key=key, nodes=nodes):
            try:
                group = "cluster:race" if i else None
                return create_job_peer(nodes[i], key, f"order:race-{i}-{key[:6]}", key_group=group)
            except PeerKeyInUse:
                return None

        won = [peer for peer in in_threads(2, add) if peer is not None]
        assert len(won) == 1
        assert JobPeer.objects.live().filter(public_key=key).count() == 1
    assert audit_ledger() == []
