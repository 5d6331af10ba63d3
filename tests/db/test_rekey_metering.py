"""A re-keyed order is billed for every byte of every key it had.

After a re-key the node still carries the old key until its agent applies the new desired state,
and just before removing it the agent sends the old key's final counters. Those samples are
billed to the same order, against the old key's own base, until the agent acknowledges the
removal; then the key is closed and may be used again, by anyone, without confusion.
"""

from __future__ import annotations

import time

import pytest
from clawnode import wire
from clawnode.keys import Identity
from django.db import IntegrityError, connection, transaction
from django.db.migrations.executor import MigrationExecutor

from frontend.order_state import usage_intervals
from marketplace import ledger
from marketplace.billing import GIB
from marketplace.listings import create_listing
from marketplace.models import Order
from marketplace.orders import place_order, provision_order, rekey_order, stop_order
from meshnet.agent_channel import acknowledge_revision, ingest_metering
from meshnet.enrolment import create_enrollment_token, enroll_node
from meshnet.models import JobPeer, JobPeerKey, MeteringSample, Node
from meshnet.nodes import revoke_node
from meshnet.units import format_bytes
from tests.factories import enroll_request, gpu, staff_login, wg_public_key

pytestmark = [pytest.mark.db]

MIB = 1 << 20
PRICE_PER_GIB = 2_000_000


class Agent:
    """Signs metering samples as the node's agent does: one boot, increasing seq and time."""

    def __init__(self, identity: Identity, node: Node) -> None:
        self.identity = identity
        self.node = node
        self.boot_id = wire.new_nonce()
        self.seq = 0
        self.clock = int(time.time())

    def envelope(self, *peers: tuple[str, int, int, int], seq: int | None = None) -> dict:
        if seq is None:
            self.seq += 1
            seq = self.seq
        self.clock += 10
        body = wire.MeteringSample(
            node_id=self.identity.node_id,
            boot_id=self.boot_id,
            seq=seq,
            sampled_at=self.clock,
            peers=tuple(
                wire.PeerCounters(public_key=key, epoch=epoch, rx_bytes=rx, tx_bytes=tx)
                for key, epoch, rx, tx in peers
            ),
        ).to_dict()
        return wire.signed_envelope(wire.METERING, body, self.identity)

    def send(self, *peers: tuple[str, int, int, int]) -> int:
        return ingest_metering(self.node, self.envelope(*peers))

    def ack(self) -> None:
        acknowledge_revision(self.node, Node.objects.get(pk=self.node.pk).desired_revision)


@pytest.fixture
def agent(provider):
    identity = Identity.generate()
    issued = create_enrollment_token(provider)
    node = enroll_node(
        enroll_request(identity, issued.token, gpus=[gpu(0), gpu(1)]), observed_ip=None
    ).node
    return Agent(identity, node)


# Not the shared listing: on the agent's node, so that its signed samples bill the order.
@pytest.fixture
def listing(provider, agent):
    return create_listing(
        provider,
        node=agent.node,
        gpu_count=2,
        price_per_gpu_hour=1_000_000,
        price_per_gib=PRICE_PER_GIB,
    )


def run_order(buyer, listing, agent, key: str) -> Order:
    ledger.grant_credits(buyer, 1_000_000_000)
    order = place_order(
        buyer, listing_id=listing.pk, gpu_count=1, hours=1, wireguard_public_key=key
    )
    provision_order(order.pk)
    agent.ack()
    order.refresh_from_db()
    assert order.state == Order.State.RUNNING
    return order


def moved(order: Order) -> tuple[int, int]:
    """(bytes_out, bytes_in) of the order: what its node received (rx) and sent (tx)."""
    order.refresh_from_db()
    return order.bytes_out, order.bytes_in


@pytest.fixture
def rekeyed(buyer, listing, agent):
    """A running order whose buyer re-keyed from old to new after one sample of the old key;
    the agent has not applied the new desired state yet."""
    old, new = wg_public_key(), wg_public_key()
    order = run_order(buyer, listing, agent, old)
    agent.send((old, 1, 0, 0))
    agent.send((old, 1, 100 * MIB, 200 * MIB))
    rekey_order(order, new)
    return order, old, new


@pytest.mark.django_db
def test_the_old_keys_bytes_after_its_last_sample_and_the_new_keys_are_all_billed(rekeyed, agent):
    order, old, new = rekeyed
    # The periodic sample while the node still has the old key, then the final counters the
    # agent sends just before it removes the old key, then the new key under its own epoch.
    assert agent.send((old, 1, 150 * MIB, 260 * MIB)) == 1
    assert agent.send((old, 1, 170 * MIB, 300 * MIB)) == 1
    agent.ack()
    assert agent.send((new, 2, 10 * MIB, 20 * MIB)) == 1
    assert agent.send((new, 2, 30 * MIB, 50 * MIB)) == 1

    total_rx, total_tx = 200 * MIB, 350 * MIB
    assert moved(order) == (total_rx, total_tx)
    peer = JobPeer.objects.get(pk=order.job_peer_id)
    assert peer.traffic_totals() == (total_rx, total_tx)
    keys = {k.public_key: k for k in JobPeerKey.objects.filter(job_peer=peer)}
    assert (keys[old].total_rx_bytes, keys[old].total_tx_bytes) == (170 * MIB, 300 * MIB)
    assert keys[old].retired_at is not None and keys[old].closed_at is not None
    assert keys[new].retired_at is None and keys[new].closed_at is None

    # The usage chart follows both keys: every byte after its first sample is in it.
    chart = usage_intervals(order)
    assert sum(i.bytes_out for i in chart) == total_rx
    assert sum(i.bytes_in for i in chart) == total_tx

    stop_order(order)
    agent.send((new, 2, 40 * MIB, 60 * MIB))  # the new key's final counters
    agent.ack()
    order.refresh_from_db()
    assert order.state == Order.State.COMPLETED
    billed = total_rx + total_tx + 20 * MIB
    assert order.settlement.bandwidth_bytes == billed
    assert order.settlement.bandwidth_charge == PRICE_PER_GIB * billed // GIB


@pytest.mark.django_db
def test_both_keys_in_one_sample_bill_the_peer_once_with_their_sum(rekeyed, agent):
    order, old, new = rekeyed
    # Between the re-key and the ack a sample may carry both (the agent added the new key).
    assert agent.send((old, 1, 120 * MIB, 230 * MIB), (new, 2, 5 * MIB, 7 * MIB)) == 1
    assert moved(order) == (125 * MIB, 237 * MIB)


@pytest.mark.django_db
def test_a_late_sample_of_the_retired_key_after_its_final_one_counts_nothing(rekeyed, agent):
    order, old, _new = rekeyed
    agent.send((old, 1, 170 * MIB, 300 * MIB))  # final counters
    agent.send((old, 1, 170 * MIB, 300 * MIB))  # the same counters again: no growth
    assert moved(order) == (170 * MIB, 300 * MIB)
    agent.ack()

    assert agent.send((old, 1, 900 * MIB, 900 * MIB)) == 0
    assert agent.send((old, 7, 5 * MIB, 5 * MIB)) == 0  # even under a newer epoch
    assert moved(order) == (170 * MIB, 300 * MIB)
    # The two after the ack name only a closed key: not stored (issue 14).
    assert MeteringSample.objects.filter(node=agent.node).count() == 4


@pytest.mark.django_db
def test_a_sample_of_only_unknown_keys_bills_nothing_and_is_not_stored(rekeyed, agent):
    # Issue 14: a node could store samples of thousands of made-up keys for 90 days.
    order, _old, _new = rekeyed
    before = moved(order)
    assert agent.send((wg_public_key(), 1, 10 * MIB, 10 * MIB)) == 0
    assert moved(order) == before
    assert not MeteringSample.objects.filter(node=agent.node, seq=agent.seq).exists()


@pytest.mark.django_db
def test_unknown_keys_beside_open_ones_are_left_out_of_the_stored_sample_and_counted(
    rekeyed, agent
):
    order, old, _new = rekeyed
    junk = [wg_public_key() for _ in range(50)]
    billed = agent.send((old, 1, 110 * MIB, 210 * MIB), *((key, 1, MIB, MIB) for key in junk))
    assert billed == 1
    assert moved(order) == (110 * MIB, 210 * MIB)
    stored = MeteringSample.objects.get(node=agent.node, seq=agent.seq)
    assert [peer["public_key"] for peer in stored.body["peers"]] == [old]
    assert stored.body["ignored_keys"] == 50
    # The signature covered the keys left out: it is not kept beside a body it does not sign.
    assert stored.signature == ""
    # Exactly once still: the same sample again changes nothing.
    assert (
        ingest_metering(agent.node, agent.envelope((old, 1, 110 * MIB, 210 * MIB), seq=agent.seq))
        == 0
    )
    assert moved(order) == (110 * MIB, 210 * MIB)


@pytest.mark.django_db
def test_a_revoked_nodes_sample_is_refused_and_stores_nothing(rekeyed, agent):
    from meshnet.agent_channel import AgentRefused

    _order, old, _new = rekeyed
    Node.objects.filter(pk=agent.node.pk).update(revoked_at=agent.node.enrolled_at)
    with pytest.raises(AgentRefused, match="revoked") as refused:
        agent.send((old, 1, 110 * MIB, 210 * MIB))
    assert refused.value.close_code == wire.CLOSE_FORBIDDEN
    assert not MeteringSample.objects.filter(node=agent.node, seq=agent.seq).exists()


@pytest.mark.django_db
def test_a_resent_final_sample_counts_once(rekeyed, agent):
    order, old, _new = rekeyed
    final = agent.envelope((old, 1, 170 * MIB, 300 * MIB))
    assert ingest_metering(agent.node, final) == 1
    assert ingest_metering(agent.node, final) == 0
    assert moved(order) == (170 * MIB, 300 * MIB)


@pytest.mark.django_db
def test_the_old_key_reused_by_another_order_later_bills_that_order(rekeyed, agent, buyer, listing):
    first, old, new = rekeyed
    agent.send((old, 1, 170 * MIB, 300 * MIB))
    agent.ack()  # the old key is off the node and closed
    second = run_order(buyer, listing, agent, old)

    assert agent.send((new, 2, 1 * MIB, 2 * MIB), (old, 3, 40 * MIB, 80 * MIB)) == 2
    assert agent.send((new, 2, 1 * MIB, 2 * MIB), (old, 3, 45 * MIB, 90 * MIB)) == 1
    assert moved(first) == (171 * MIB, 302 * MIB)
    assert moved(second) == (45 * MIB, 90 * MIB)
    assert JobPeerKey.objects.filter(public_key=old).count() == 2
    assert JobPeerKey.objects.filter(public_key=old, closed_at__isnull=True).get().job_peer_id == (
        second.job_peer_id
    )
    # Each order's chart has its own bytes only (after its first sample, the chart's origin).
    assert sum(i.bytes_out for i in usage_intervals(second)) == 5 * MIB


@pytest.mark.django_db
def test_the_old_key_is_not_reused_before_its_final_counters_are_taken(
    rekeyed, agent, buyer, listing
):
    first, old, _new = rekeyed
    ledger.grant_credits(buyer, 1_000_000_000)
    second = place_order(
        buyer, listing_id=listing.pk, gpu_count=1, hours=1, wireguard_public_key=old
    )
    second = provision_order(second.pk)
    assert second.state == Order.State.FAILED
    assert "already in use" in second.reason
    # The old key's final sample still bills the first order.
    agent.send((old, 1, 170 * MIB, 300 * MIB))
    assert moved(first) == (170 * MIB, 300 * MIB)


@pytest.mark.django_db
def test_rekeying_back_to_a_key_not_yet_closed_carries_on_from_its_base(rekeyed, agent):
    order, old, new = rekeyed
    rekey_order(order, old)  # the buyer found the old private key again, before the ack
    peer = JobPeer.objects.get(pk=order.job_peer_id)
    current = JobPeerKey.objects.get(job_peer=peer, retired_at__isnull=True)
    assert current.public_key == old and JobPeerKey.objects.filter(job_peer=peer).count() == 2
    agent.ack()  # the node kept the old key all along and never had the new one

    assert agent.send((old, 1, 130 * MIB, 210 * MIB)) == 1
    assert moved(order) == (130 * MIB, 210 * MIB)
    assert JobPeerKey.objects.get(public_key=new).closed_at is not None


@pytest.mark.django_db
def test_a_removed_peers_final_sample_counts_and_nothing_after_the_ack(buyer, listing, agent):
    key = wg_public_key()
    order = run_order(buyer, listing, agent, key)
    agent.send((key, 1, 0, 0))
    stop_order(order)
    assert agent.send((key, 1, 3 * MIB, 4 * MIB)) == 1
    agent.ack()
    assert agent.send((key, 1, 9 * MIB, 9 * MIB)) == 0
    order.refresh_from_db()
    assert order.state == Order.State.COMPLETED
    assert order.settlement.bandwidth_bytes == 7 * MIB
    assert JobPeerKey.objects.get(public_key=key).closed_at is not None


@pytest.mark.django_db
def test_a_failed_removal_keeps_the_old_key_open_until_it_succeeds(rekeyed, agent):
    order, old, _new = rekeyed
    revision = Node.objects.get(pk=agent.node.pk).desired_revision
    acknowledge_revision(agent.node, revision, failed_keys=frozenset({old}))
    assert JobPeerKey.objects.get(public_key=old).closed_at is None
    agent.send((old, 1, 110 * MIB, 210 * MIB))
    agent.ack()
    assert JobPeerKey.objects.get(public_key=old).closed_at is not None
    assert moved(order) == (110 * MIB, 210 * MIB)


@pytest.mark.django_db
def test_revoking_the_node_closes_its_keys(rekeyed, agent):
    _order, old, new = rekeyed
    revoke_node(agent.node)
    assert not JobPeerKey.objects.filter(public_key__in=[old, new], closed_at__isnull=True)


@pytest.mark.django_db
def test_the_database_refuses_two_open_rows_of_a_key_and_two_current_keys_of_a_peer(rekeyed):
    order, old, new = rekeyed
    peer = JobPeer.objects.get(pk=order.job_peer_id)
    with pytest.raises(IntegrityError), transaction.atomic():
        JobPeerKey.objects.create(
            job_peer=peer, node=peer.node, public_key=new, added_revision=1,
            retired_at=order.created_at, retired_revision=1,
        )  # fmt: skip
    with pytest.raises(IntegrityError), transaction.atomic():
        JobPeerKey.objects.create(
            job_peer=peer, node=peer.node, public_key=wg_public_key(), added_revision=1
        )
    with pytest.raises(IntegrityError), transaction.atomic():
        JobPeerKey.objects.filter(public_key=old).update(retired_revision=None)


@pytest.mark.django_db
def test_the_admin_shows_every_key_of_a_peer_with_its_bytes(rekeyed, agent, client, make_user):
    order, old, new = rekeyed
    agent.send((old, 1, 170 * MIB, 300 * MIB))
    operator = make_user("keyhist-ops")
    operator.is_staff = operator.is_superuser = True
    operator.save()
    staff_login(client, operator)

    page = client.get(f"/admin/meshnet/jobpeer/{order.job_peer_id}/change/").content.decode()
    assert old in page and new in page
    assert format_bytes(170 * MIB) == "170 MiB"
    assert "170 MiB" in page
    listing = client.get("/admin/meshnet/jobpeer/").content.decode()
    assert "170 MiB" in listing  # the peer's rx over all its keys
    keys = client.get("/admin/meshnet/jobpeerkey/?key=retired_open").content.decode()
    assert old[:8] in keys and new[:8] not in keys


# --- the migration -----------------------------------------------------------------------------

BEFORE = [("meshnet", "0005_node_outage")]


@pytest.fixture
def migrated_back():
    """The schema before the key history; every migration applied again afterwards, whatever
    the test did, so the tests after it find the schema they expect."""
    executor = MigrationExecutor(connection)
    executor.migrate(BEFORE)
    yield executor.loader.project_state(BEFORE).apps
    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes())


@pytest.mark.django_db(transaction=True)
def test_the_migration_gives_every_peer_its_current_key_with_its_traffic(provider, migrated_back):
    apps = migrated_back
    node = apps.get_model("meshnet", "Node").objects.create(
        owner_id=provider.pk,
        node_id="n" * 40,
        name="node-old",
        identity_public_key="i" * 44,
        wireguard_public_key="w" * 44,
        mesh_address="10.77.0.9",
    )
    peer_model = apps.get_model("meshnet", "JobPeer")
    live = peer_model.objects.create(
        node=node, public_key="a" * 44, address="10.78.0.2", ref="order:1", added_revision=3,
        state="active",
    )  # fmt: skip
    gone = peer_model.objects.create(
        node=node, public_key="b" * 44, address="10.78.0.3", ref="order:2", added_revision=1,
        state="removed", removed_revision=2,
    )  # fmt: skip
    apps.get_model("meshnet", "PeerTraffic").objects.create(
        job_peer=live, epoch=4, rx_bytes=10, tx_bytes=20, total_rx_bytes=500, total_tx_bytes=900
    )

    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes())

    current = JobPeerKey.objects.get(job_peer_id=live.pk)
    assert (current.public_key, current.epoch, current.rx_bytes, current.tx_bytes) == (
        "a" * 44,
        4,
        10,
        20,
    )
    assert (current.total_rx_bytes, current.total_tx_bytes) == (500, 900)
    assert current.closed_at is None and current.retired_at is None
    assert current.added_revision == 3
    closed = JobPeerKey.objects.get(job_peer_id=gone.pk)
    assert closed.closed_at is not None and closed.total_rx_bytes == 0
