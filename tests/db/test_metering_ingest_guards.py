"""What metering ingestion does beyond the common case, each pinned down directly (issue 17's
mutation run of `ingest_metering`, `_open_node_message` and `_open_keys`): samples naming two
peers, one direction moving alone, two boots' seq 1, another node's key, the refusals' words and
close codes, the idle sample and the log line of ignored keys."""

from __future__ import annotations

import logging
import time

import pytest
from clawnode import wire
from clawnode.keys import Identity

from marketplace import ledger
from marketplace.listings import create_listing
from marketplace.models import Order
from marketplace.orders import place_order, provision_order
from meshnet.agent_channel import AgentRefused, acknowledge_revision, ingest_metering
from meshnet.enrolment import create_enrollment_token, enroll_node
from meshnet.models import JobPeerKey, MeteringSample, Node
from tests.factories import enroll_request, gpu, wg_public_key

pytestmark = [pytest.mark.db, pytest.mark.django_db]

BOOT = wire.new_nonce()


def enrolled(provider) -> tuple[Identity, Node]:
    identity = Identity.generate()
    issued = create_enrollment_token(provider)
    request = enroll_request(identity, issued.token, gpus=[gpu(0), gpu(1)])
    return identity, enroll_node(request, observed_ip=None).node


def running_orders(buyer, provider, node, count: int) -> list[tuple[Order, str]]:
    """`count` running orders of one GPU each on `node`, each with its own WireGuard key."""
    listing = create_listing(
        provider, node=node, gpu_count=count, price_per_gpu_hour=1_000_000, price_per_gib=0
    )
    ledger.grant_credits(buyer, 100_000_000)
    orders = []
    for _ in range(count):
        key = wg_public_key()
        order = place_order(
            buyer, listing_id=listing.pk, gpu_count=1, hours=1, wireguard_public_key=key
        )
        orders.append((provision_order(order.pk), key))
    acknowledge_revision(node, Node.objects.get(pk=node.pk).desired_revision)
    for order, _key in orders:
        order.refresh_from_db()
        assert order.state == Order.State.RUNNING
    return orders


@pytest.fixture
def two_peers(buyer, provider):
    """A node's identity, the node, and two running orders on it: [(order, key), (order, key)]."""
    identity, node = enrolled(provider)
    return identity, node, running_orders(buyer, provider, node, 2)


def sample(identity, seq, *peers, boot_id=BOOT, sampled_at=None, node_id=None):
    """A signed metering sample; each peer is (key, epoch, rx, tx)."""
    body = wire.MeteringSample(
        node_id=node_id or identity.node_id,
        boot_id=boot_id,
        seq=seq,
        sampled_at=int(time.time()) if sampled_at is None else sampled_at,
        peers=tuple(
            wire.PeerCounters(public_key=key, epoch=epoch, rx_bytes=rx, tx_bytes=tx)
            for key, epoch, rx, tx in peers
        ),
    ).to_dict()
    return wire.signed_envelope(wire.METERING, body, identity)


def bytes_of(order) -> tuple[int, int]:
    order.refresh_from_db()
    return order.bytes_out, order.bytes_in


# -- billing ---------------------------------------------------------------------------------------


def test_a_sample_where_only_one_direction_moved_bills_that_direction(two_peers):
    # An idle download, a busy upload: most samples of a real job move one counter only.
    identity, node, [(order, key), _] = two_peers
    assert ingest_metering(node, sample(identity, 1, (key, 1, 1000, 1000))) == 1

    assert ingest_metering(node, sample(identity, 2, (key, 1, 1500, 1000))) == 1
    assert bytes_of(order) == (1500, 1000)
    assert ingest_metering(node, sample(identity, 3, (key, 1, 1500, 1800))) == 1
    assert bytes_of(order) == (1500, 1800)


def test_a_sample_moving_two_peers_bills_each_its_own_bytes_and_counts_two(two_peers):
    identity, node, [(first, a), (second, b)] = two_peers

    assert ingest_metering(node, sample(identity, 1, (a, 1, 100, 200), (b, 1, 300, 400))) == 2

    assert bytes_of(first) == (100, 200)
    assert bytes_of(second) == (300, 400)


def test_a_late_older_epoch_reading_listed_first_still_lets_the_other_peer_bill(two_peers):
    # The agent resends a's final counters of epoch 1 after a's re-add (epoch 2), in a sample
    # that also carries b's growth: a counts nothing, b counts its growth.
    identity, node, [(first, a), (second, b)] = two_peers
    ingest_metering(node, sample(identity, 1, (a, 1, 1000, 1000), (b, 1, 10, 10)))
    ingest_metering(node, sample(identity, 2, (a, 2, 50, 50)))

    assert ingest_metering(node, sample(identity, 3, (a, 1, 1000, 1000), (b, 1, 70, 90))) == 1

    assert bytes_of(first) == (1050, 1050)
    assert bytes_of(second) == (70, 90)


def test_a_stale_reading_listed_first_still_lets_the_other_peer_bill(two_peers):
    # seq 2 arrives after seq 3 (an old connection's backlog): a's reading in it is older than
    # a's base (seq 3), b's is newer than b's (seq 1, b was not in seq 3). b's growth counts.
    identity, node, [(first, a), (second, b)] = two_peers
    ingest_metering(node, sample(identity, 1, (a, 1, 100, 100), (b, 1, 10, 10)))
    ingest_metering(node, sample(identity, 3, (a, 1, 300, 300)))

    assert ingest_metering(node, sample(identity, 2, (a, 1, 200, 200), (b, 1, 40, 60))) == 1

    assert bytes_of(first) == (300, 300)
    assert bytes_of(second) == (40, 60)


def test_each_key_keeps_the_running_total_of_what_it_billed(two_peers):
    identity, node, [(_order, key), _] = two_peers
    for seq, (rx, tx) in enumerate([(100, 10), (250, 40), (20, 5)], start=1):  # the last: reset
        ingest_metering(node, sample(identity, seq, (key, 1, rx, tx)))

    stored = JobPeerKey.objects.get(public_key=key)
    assert (stored.total_rx_bytes, stored.total_tx_bytes) == (270, 45)
    assert (stored.epoch, stored.rx_bytes, stored.tx_bytes) == (1, 20, 5)


def test_a_new_boots_seq_1_is_a_new_sample_not_a_resend_of_the_old_boots(two_peers):
    # Each agent process counts seq from 1: only (boot_id, seq) together name a sample once.
    identity, node, [(order, key), _] = two_peers
    now = int(time.time())
    old_boot, new_boot = wire.new_nonce(), wire.new_nonce()
    ingest_metering(
        node, sample(identity, 1, (key, 1, 1000, 2000), boot_id=old_boot, sampled_at=now - 60)
    )

    assert (
        ingest_metering(
            node, sample(identity, 1, (key, 2, 300, 400), boot_id=new_boot, sampled_at=now)
        )
        == 1
    )

    assert bytes_of(order) == (1300, 2400)
    stored = MeteringSample.objects.filter(node=node).order_by("sampled_at")
    assert [(s.boot_id, s.seq, int(s.sampled_at.timestamp())) for s in stored] == [
        (old_boot, 1, now - 60),
        (new_boot, 1, now),
    ]


# -- what is not billed ----------------------------------------------------------------------------


def test_a_sample_naming_another_nodes_open_key_bills_nothing_and_stores_nothing(
    two_peers, provider
):
    # A node could otherwise move (and inflate) the bill of an order it does not run.
    _identity, _node, [(order, key), _] = two_peers
    intruder, intruder_node = enrolled(provider)

    assert ingest_metering(intruder_node, sample(intruder, 1, (key, 1, 10**9, 10**9))) == 0

    assert bytes_of(order) == (0, 0)
    assert not MeteringSample.objects.filter(node=intruder_node).exists()
    assert JobPeerKey.objects.get(public_key=key).last_sample_at is None


def test_an_idle_nodes_sample_naming_no_peer_bills_none_and_stores_nothing(two_peers):
    identity, node, _orders = two_peers

    assert ingest_metering(node, sample(identity, 1)) == 0

    assert not MeteringSample.objects.filter(node=node).exists()


def test_keys_with_no_peer_on_the_node_are_logged_with_how_many(two_peers, caplog):
    identity, node, [(_order, key), _] = two_peers
    unknown = (wg_public_key(), 1, 5, 5)
    caplog.set_level(logging.INFO, logger="meshnet.agent_channel")

    ingest_metering(node, sample(identity, 1, (key, 1, 10, 10), unknown, unknown))

    assert [r.getMessage() for r in caplog.records if r.name == "meshnet.agent_channel"] == [
        f"node {node}: metering sample names 2 key(s) it has no peer for"
    ]


# -- refusals: the words the gateway logs and the close code that tells the agent not to retry --


def refused(node, envelope) -> AgentRefused:
    with pytest.raises(AgentRefused) as caught:
        ingest_metering(node, envelope)
    return caught.value


@pytest.mark.parametrize("frame", [["not", "an", "envelope"], "metering", None])
def test_a_frame_that_is_not_an_envelope_is_refused_as_a_bad_message(two_peers, frame):
    _identity, node, _orders = two_peers

    error = refused(node, frame)

    assert str(error).startswith("metering sample refused: ")
    assert error.close_code == wire.CLOSE_BAD_MESSAGE


def test_a_sample_signed_by_another_key_is_refused_as_a_bad_message(two_peers):
    identity, node, [(_order, key), _] = two_peers
    forged = sample(Identity.generate(), 1, (key, 1, 10, 10), node_id=identity.node_id)

    error = refused(node, forged)

    assert str(error).startswith("metering sample refused: ")
    assert error.close_code == wire.CLOSE_BAD_MESSAGE
    assert not MeteringSample.objects.exists()


def test_a_sample_naming_another_node_is_refused_as_a_bad_message(two_peers, provider):
    identity, node, [(_order, key), _] = two_peers
    other, _other_node = enrolled(provider)
    # Signed by this node's identity, but for the other node.
    envelope = sample(identity, 1, (key, 1, 10, 10), node_id=other.node_id)

    error = refused(node, envelope)

    assert str(error) == "metering sample names another node"
    assert error.close_code == wire.CLOSE_BAD_MESSAGE
    assert not MeteringSample.objects.exists()


def test_a_sample_of_a_node_revoked_meanwhile_is_refused_for_good(two_peers):
    identity, node, [(order, key), _] = two_peers
    Node.objects.filter(pk=node.pk).update(revoked_at=node.enrolled_at)

    error = refused(node, sample(identity, 1, (key, 1, 10, 10)))

    assert str(error) == "node revoked"
    assert error.close_code == wire.CLOSE_FORBIDDEN
    assert bytes_of(order) == (0, 0)
    assert not MeteringSample.objects.exists()
