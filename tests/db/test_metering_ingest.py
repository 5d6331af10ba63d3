"""Signed metering samples become order bytes once, across resends and counter resets."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from clawnode import wire
from clawnode.keys import Identity
from django.utils import timezone

import meshnet.tasks
from marketplace import ledger
from marketplace.listings import create_listing
from marketplace.models import Order
from marketplace.orders import place_order, provision_order, stop_order
from meshnet.agent_channel import (
    AgentRefused,
    acknowledge_revision,
    ingest_metering,
    process_ack,
    process_removed,
)
from meshnet.enrolment import create_enrollment_token, enroll_node
from meshnet.models import JobPeer, JobPeerKey, MeteringSample, Node
from tests.factories import enroll_request, gpu, wg_public_key

pytestmark = [pytest.mark.db, pytest.mark.django_db]

BOOT = wire.new_nonce()


@pytest.fixture
def running_job(buyer, provider):
    identity = Identity.generate()
    issued = create_enrollment_token(provider)
    node = enroll_node(enroll_request(identity, issued.token, gpus=[gpu(0)]), observed_ip=None).node
    listing = create_listing(
        provider, node=node, gpu_count=1, price_per_gpu_hour=1_000_000, price_per_gib=0
    )
    ledger.grant_credits(buyer, 10_000_000)
    key = wg_public_key()
    order = place_order(
        buyer, listing_id=listing.pk, gpu_count=1, hours=1, wireguard_public_key=key
    )
    order = provision_order(order.pk)
    acknowledge_revision(node, node.__class__.objects.get(pk=node.pk).desired_revision)
    order.refresh_from_db()
    assert order.state == "running"
    return identity, node, order, key


def sample(identity, key, seq, epoch, rx, tx, signer=None, *, boot_id=BOOT, sampled_at=None):
    body = wire.MeteringSample(
        node_id=identity.node_id,
        boot_id=boot_id,
        seq=seq,
        sampled_at=int(time.time()) if sampled_at is None else sampled_at,
        peers=(wire.PeerCounters(public_key=key, epoch=epoch, rx_bytes=rx, tx_bytes=tx),),
    ).to_dict()
    return wire.signed_envelope(wire.METERING, body, signer or identity)


def test_samples_add_deltas_to_the_order(running_job):
    identity, node, order, key = running_job
    ingest_metering(node, sample(identity, key, 1, 0, 1000, 5000))
    ingest_metering(node, sample(identity, key, 2, 0, 1500, 9000))
    order.refresh_from_db()
    # rx is what the provider received (the buyer sent): the buyer's bytes_out.
    assert (order.bytes_out, order.bytes_in) == (1500, 9000)


def test_a_resent_sample_counts_once(running_job):
    identity, node, order, key = running_job
    envelope = sample(identity, key, 1, 0, 1000, 2000)
    assert ingest_metering(node, envelope) == 1
    assert ingest_metering(node, envelope) == 0
    order.refresh_from_db()
    assert (order.bytes_out, order.bytes_in) == (1000, 2000)
    assert MeteringSample.objects.filter(node=node).count() == 1


def test_counter_reset_with_new_epoch_loses_nothing(running_job):
    identity, node, order, key = running_job
    ingest_metering(node, sample(identity, key, 1, 0, 1000, 1000))
    ingest_metering(node, sample(identity, key, 2, 1, 300, 400))  # agent restarted the peer
    ingest_metering(node, sample(identity, key, 3, 1, 800, 900))
    order.refresh_from_db()
    assert (order.bytes_out, order.bytes_in) == (1800, 1900)


def bytes_of(order) -> tuple[int, int]:
    order.refresh_from_db()
    return order.bytes_out, order.bytes_in


def test_samples_resent_and_reordered_bill_exactly_the_counted_bytes(running_job):
    # A resend of an earlier sample after a later one must not read as a counter reset (its
    # counters are lower than the last ones seen): the stored (boot_id, seq) stops it first.
    identity, node, order, key = running_job
    first = sample(identity, key, 1, 1, 1000, 2000)
    second = sample(identity, key, 2, 1, 3000, 4000)
    assert ingest_metering(node, first) == 1
    assert ingest_metering(node, second) == 1

    billed = [ingest_metering(node, resent) for resent in (first, second, first, second)]

    assert bytes_of(order) == (3000, 4000)
    assert billed == [0, 0, 0, 0]
    ingest_metering(node, sample(identity, key, 3, 1, 3500, 4100))
    assert bytes_of(order) == (3500, 4100)
    assert MeteringSample.objects.filter(node=node).count() == 3


def test_a_late_sample_of_an_older_epoch_leaves_the_newer_base_alone(running_job):
    # The agent resends a removed peer's final counters after a reconnect, under a new seq; the
    # key may have been added again meanwhile (a new epoch, counters from zero). The late final
    # counts nothing and must not become the base: the next sample of the current epoch would
    # then be counted from zero again.
    identity, node, order, key = running_job
    ingest_metering(node, sample(identity, key, 1, 1, 1000, 1000))  # final of epoch 1
    ingest_metering(node, sample(identity, key, 2, 2, 500, 700))  # re-added: epoch 2
    assert bytes_of(order) == (1500, 1700)

    assert ingest_metering(node, sample(identity, key, 3, 1, 1000, 1000)) == 0  # late

    assert bytes_of(order) == (1500, 1700)
    ingest_metering(node, sample(identity, key, 4, 2, 600, 900))
    assert bytes_of(order) == (1600, 1900)
    stored = JobPeerKey.objects.get(public_key=key)
    assert (stored.epoch, stored.rx_bytes, stored.tx_bytes) == (2, 600, 900)


def test_samples_of_one_epoch_out_of_seq_order_bill_the_counted_bytes_once(running_job):
    # An old connection's consumer can still be working through its backlog while the agent's
    # new connection sends: seq 2 arrives after seq 3. Its lower reading is no counter reset.
    identity, node, order, key = running_job
    for seq, counted in ((1, 1000), (3, 1100), (2, 1050), (4, 1200)):
        ingest_metering(node, sample(identity, key, seq, 1, counted, counted))

    assert bytes_of(order) == (1200, 1200)
    stored = JobPeerKey.objects.get(public_key=key)
    assert (stored.rx_bytes, stored.base_boot_id, stored.base_seq) == (1200, BOOT, 4)
    assert MeteringSample.objects.filter(node=node).count() == 4  # stored as received


def test_a_stored_sample_keeps_the_agents_signature_so_the_bill_can_be_proved(running_job):
    identity, node, _order, key = running_job
    envelope = sample(identity, key, 1, 0, 1000, 2000)
    ingest_metering(node, envelope)

    stored = MeteringSample.objects.get(node=node)
    assert stored.signature == envelope["signature"]
    # Anyone holding the node's public key can check the stored row on its own.
    wire.verify(identity.public_key, wire.METERING, stored.body, stored.signature)


def test_a_restarted_agents_lower_seq_and_counters_read_as_a_reset_not_a_stale_sample(
    running_job,
):
    # A new boot starts its seq again. Seq orders samples only within a boot: across boots the
    # later sample (by the agent's clock) with lower counters in the same epoch is a reset of
    # the device, and its bytes count in full.
    identity, node, order, key = running_job
    now = int(time.time())
    ingest_metering(node, sample(identity, key, 5, 1, 1000, 1000, sampled_at=now - 60))

    ingest_metering(node, sample(identity, key, 1, 1, 200, 300, boot_id="b" * 32, sampled_at=now))

    assert bytes_of(order) == (1200, 1300)


def test_within_one_boot_seq_orders_samples_even_when_the_agents_clock_stepped(running_job):
    # The late sample of this boot (lower seq) carries a later time: the clock stepped back in
    # between. Seq, not the clock, says it is older, and it bills nothing.
    identity, node, order, key = running_job
    now = int(time.time())
    ingest_metering(node, sample(identity, key, 2, 1, 1100, 1100, sampled_at=now - 60))

    assert ingest_metering(node, sample(identity, key, 1, 1, 1000, 1000, sampled_at=now)) == 0

    assert bytes_of(order) == (1100, 1100)


def test_sample_signed_by_another_key_is_refused_and_stores_nothing(running_job):
    identity, node, order, key = running_job
    with pytest.raises(AgentRefused, match="metering sample refused"):
        ingest_metering(node, sample(identity, key, 1, 0, 10, 10, signer=Identity.generate()))
    order.refresh_from_db()
    assert (order.bytes_out, order.bytes_in) == (0, 0)
    assert not MeteringSample.objects.exists()


# -- a removal in two steps: cut off (ack names the key removing), then removed ----------------


def signed(identity, kind, message):
    return wire.signed_envelope(kind, message.to_dict(), identity)


def stop_and_ack(identity, node, order, key, removing=()) -> wire.Ack:
    """Stop the order; the agent's ack of the revision that took its peer off."""
    stop_order(order)
    return wire.Ack(
        node_id=identity.node_id,
        revision=Node.objects.get(pk=node.pk).desired_revision,
        results=(wire.PeerResult(key, ok=True),),
        timestamp=int(time.time()),
        removing=removing,
    )


def test_a_peer_acked_as_removing_stays_billable_until_removed_names_it(running_job):
    identity, node, order, key = running_job
    ingest_metering(node, sample(identity, key, 1, 0, 1000, 5000))
    ack = stop_and_ack(identity, node, order, key, removing=(key,))

    process_ack(node, signed(identity, wire.ACK, ack))

    peer = JobPeer.objects.get(ref=f"order:{order.pk}")
    assert peer.state == "removing"
    assert Order.objects.get(pk=order.pk).state == "stopping"  # not settled yet
    assert Node.objects.get(pk=node.pk).acked_revision == ack.revision  # applied: no re-push
    assert JobPeerKey.objects.get(public_key=key).closed_at is None
    # The final counters, read after the cut-off, are billed to the key still open.
    ingest_metering(node, sample(identity, key, 2, 0, 1200, 5900))
    removed = wire.Removed(node_id=identity.node_id, public_keys=(key,), timestamp=1)

    process_removed(node, signed(identity, wire.REMOVED, removed))

    assert JobPeer.objects.get(pk=peer.pk).state == "removed"
    assert JobPeerKey.objects.get(public_key=key).closed_at is not None
    order = Order.objects.get(pk=order.pk)
    assert order.state == "completed"
    assert (order.bytes_out, order.bytes_in) == (1200, 5900)
    # A later sample of the closed key is not billed; a repeated report changes nothing.
    ingest_metering(node, sample(identity, key, 3, 0, 9999, 9999))
    process_removed(node, signed(identity, wire.REMOVED, removed))
    order.refresh_from_db()
    assert (order.state, order.bytes_out, order.bytes_in) == ("completed", 1200, 5900)


def test_a_removal_report_cannot_end_a_peer_the_gateway_still_wants(running_job):

    identity, node, order, key = running_job
    removed = wire.Removed(node_id=identity.node_id, public_keys=(key,), timestamp=1)

    process_removed(node, signed(identity, wire.REMOVED, removed))

    assert JobPeer.objects.get(ref=f"order:{order.pk}").state == "active"
    assert JobPeerKey.objects.get(public_key=key).closed_at is None
    assert Order.objects.get(pk=order.pk).state == "running"


def test_a_removal_report_signed_by_another_key_or_for_another_node_is_refused(running_job):

    identity, node, order, key = running_job
    removed = wire.Removed(node_id=identity.node_id, public_keys=(key,), timestamp=1)
    with pytest.raises(AgentRefused, match="removal report refused"):
        process_removed(node, signed(Identity.generate(), wire.REMOVED, removed))
    other = Identity.generate()
    elsewhere = wire.Removed(node_id=other.node_id, public_keys=(key,), timestamp=1)
    with pytest.raises(AgentRefused, match="another node"):
        process_removed(node, signed(identity, wire.REMOVED, elsewhere))
    assert JobPeer.objects.get(ref=f"order:{order.pk}").state == "active"


# -- retention ------------------------------------------------------------------------------------


def test_samples_past_the_retention_are_pruned_oldest_first_and_no_bill_changes(
    running_job, settings, monkeypatch
):
    identity, node, order, key = running_job
    for seq, (rx, tx) in enumerate([(100, 200), (300, 500), (700, 900)], start=1):
        ingest_metering(node, sample(identity, key, seq, 0, rx, tx))
    past = timezone.now() - timedelta(days=settings.MOLT_METERING_RETENTION_DAYS, minutes=1)
    MeteringSample.objects.filter(seq__in=(1, 2)).update(received_at=past)
    monkeypatch.setattr(meshnet.tasks, "PRUNE_BATCH", 1)  # two batches

    assert meshnet.tasks.prune_metering_samples() == 2

    assert list(MeteringSample.objects.values_list("seq", flat=True)) == [3]
    order.refresh_from_db()
    assert (order.bytes_out, order.bytes_in) == (700, 900)
    # Billing goes on from the key's own base, not from the samples.
    ingest_metering(node, sample(identity, key, 4, 0, 1000, 1000))
    order.refresh_from_db()
    assert (order.bytes_out, order.bytes_in) == (1000, 1000)
    assert meshnet.tasks.prune_metering_samples() == 0


def test_an_ack_of_the_first_version_still_completes_a_removal(running_job):
    # An agent not yet upgraded removes the peer, its final counters sent, then acknowledges
    # with molt/ack/v1 (no `removing`): the removal is done at once, as it always was.
    identity, node, order, key = running_job
    body = stop_and_ack(identity, node, order, key).to_dict()
    del body["removing"]
    with pytest.raises(AgentRefused, match="a v1 ack has no removing"):
        process_ack(
            node,
            wire.signed_envelope(wire.ACK_V1, {**body, "removing": [key]}, identity),
        )
    assert Order.objects.get(pk=order.pk).state == "stopping"

    process_ack(node, wire.signed_envelope(wire.ACK_V1, body, identity))

    assert Order.objects.get(pk=order.pk).state == "completed"
    assert JobPeerKey.objects.get(public_key=key).closed_at is not None
