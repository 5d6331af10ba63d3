"""Billing around the provider's availability and the bandwidth allowance.

Heartbeats (meshnet.nodes.record_heartbeat, the path the agent channel calls) record a
NodeOutage whenever they resume after a silence longer than MOLT_NODE_OFFLINE_AFTER_SECONDS;
settlement leaves outages out of the billed time. A node silent past
MOLT_NODE_FAILURE_GRACE_SECONDS fails its running orders, billed up to its last heartbeat. Real
signed metering samples that reach the bandwidth allowance stop the job with that reason.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from clawnode import wire
from clawnode.keys import Identity
from django.utils import timezone

from marketplace import billing, ledger, payments
from marketplace.audit import audit_ledger
from marketplace.listings import create_listing
from marketplace.models import EscrowHold, Order, Settlement
from marketplace.orders import (
    BANDWIDTH_USED_UP,
    expire_orders,
    place_order,
    provision_order,
    stop_order,
)
from meshnet.agent_channel import acknowledge_revision, ingest_metering
from meshnet.enrolment import create_enrollment_token, enroll_node
from meshnet.models import JobPeer, Node, NodeOutage
from meshnet.nodes import close_out_silent_nodes, record_heartbeat, revoke_node
from tests import factories

pytestmark = [pytest.mark.db, pytest.mark.django_db]

PRICE = 3_600_000  # per GPU-hour: exactly 1000 micro-USD per GPU-second, so seconds read off


@pytest.fixture
def identity():
    return Identity.generate()


# Enrolled with the `identity` above, not the shared node: the tests sign metering as its agent.
@pytest.fixture
def node(provider, identity):
    issued = create_enrollment_token(provider)
    envelope = factories.enroll_request(
        identity, issued.token, gpus=[factories.gpu(i) for i in range(2)]
    )
    return enroll_node(envelope, observed_ip="203.0.113.10").node


# At PRICE, not the shared 2 USD: billed seconds read off the charges.
@pytest.fixture
def listing(provider, node):
    return create_listing(
        provider, node=node, gpu_count=2, price_per_gpu_hour=PRICE, price_per_gib=10_000
    )


def heartbeat(node: Node, at) -> None:
    record_heartbeat(Node.objects.get(pk=node.pk), at=at)


def online(node: Node, start, end, every=timedelta(seconds=15)) -> None:
    """The agent's heartbeats from `start` to `end` (both included), as a live agent sends."""
    at = start
    while at < end:
        heartbeat(node, at)
        at += every
    heartbeat(node, end)


def ack(node: Node, at=None) -> None:
    node.refresh_from_db()
    acknowledge_revision(node, node.desired_revision, at=at)


def running(buyer, listing, node, *, started, gpu_count=1, hours=2) -> Order:
    order = place_order(
        buyer,
        listing_id=listing.pk,
        gpu_count=gpu_count,
        hours=hours,
        wireguard_public_key=factories.wg_public_key(),
    )
    provision_order(order.pk)
    ack(node, at=started)
    order = Order.objects.get(pk=order.pk)
    assert order.state == "running"
    return order


# --- outages -----------------------------------------------------------------------------------


def test_heartbeats_resuming_after_a_long_silence_record_one_outage(node, settings):
    limit = settings.MOLT_NODE_OFFLINE_AFTER_SECONDS
    t0 = timezone.now() - timedelta(hours=1)
    heartbeat(node, t0)
    heartbeat(node, t0 + timedelta(seconds=limit))  # exactly the limit: still online
    assert not NodeOutage.objects.exists()
    back = t0 + timedelta(seconds=limit + 600)
    heartbeat(node, back)
    outage = NodeOutage.objects.get()
    assert (outage.started_at, outage.ended_at) == (t0 + timedelta(seconds=limit), back)
    # A late heartbeat from before neither moves the clock back nor records anything.
    heartbeat(node, t0 + timedelta(seconds=5))
    assert Node.objects.get(pk=node.pk).last_seen_at == back
    assert NodeOutage.objects.count() == 1


def test_time_the_node_was_offline_is_not_billed(funded_buyer, listing, node, settings):
    start = timezone.now() - timedelta(hours=1)
    heartbeat(node, start)
    order = running(funded_buyer, listing, node, started=start, gpu_count=2)
    online(node, start, start + timedelta(minutes=10))
    # Silent from minute 10 to minute 25: fifteen minutes offline.
    online(node, start + timedelta(minutes=25), start + timedelta(minutes=55))
    stop_order(Order.objects.get(pk=order.pk))
    ack(node)

    s = Settlement.objects.get(order=order)
    span = int((Order.objects.get(pk=order.pk).stop_requested_at - start).total_seconds())
    assert s.offline_seconds == 15 * 60
    assert s.billed_seconds == span - 15 * 60
    assert s.time_charge == 2 * 1000 * s.billed_seconds
    assert audit_ledger() == []

    receipt = payments.receipt_for(Order.objects.get(pk=order.pk))
    lines = {line["kind"]: line for line in receipt["lines"]}
    assert lines["time"]["seconds"] == span and lines["time"]["amount"] == 2 * 1000 * span
    assert lines["offline_credit"]["seconds"] == 15 * 60
    assert lines["offline_credit"]["amount"] == -2 * 1000 * 15 * 60
    assert sum(line["amount"] for line in receipt["lines"]) == s.captured


def test_only_the_part_of_an_outage_inside_the_billed_span_counts(funded_buyer, listing, node):
    start = timezone.now() - timedelta(hours=2)
    heartbeat(node, start - timedelta(minutes=30))
    # Offline from -30 to +5 (5 minutes inside the booking), then from 50 to 90 (10 inside).
    online(node, start + timedelta(minutes=5), start + timedelta(minutes=50))
    order = running(funded_buyer, listing, node, started=start, hours=1)
    online(node, start + timedelta(minutes=90), start + timedelta(minutes=100))
    expire_orders()  # booked time is up
    ack(node)
    s = Settlement.objects.get(order=order)
    assert s.offline_seconds == 15 * 60
    assert s.billed_seconds == 3600 - 15 * 60


def test_a_short_silence_is_billed(funded_buyer, listing, node, settings):
    start = timezone.now() - timedelta(minutes=30)
    heartbeat(node, start)
    order = running(funded_buyer, listing, node, started=start)
    heartbeat(node, start + timedelta(seconds=settings.MOLT_NODE_OFFLINE_AFTER_SECONDS - 1))
    stop_order(order)
    ack(node)
    assert Settlement.objects.get(order=order).offline_seconds == 0


# --- a node lost past the grace period -----------------------------------------------------------


def test_a_running_order_on_a_node_silent_past_the_grace_fails_billed_to_its_last_heartbeat(
    funded_buyer, provider, listing, node, settings
):
    grace = settings.MOLT_NODE_FAILURE_GRACE_SECONDS
    start = timezone.now() - timedelta(minutes=40)
    heartbeat(node, start)
    order = running(funded_buyer, listing, node, started=start)
    last = start + timedelta(minutes=20)
    online(node, start, last)
    wallet = ledger.available_for(funded_buyer)

    # Within the grace nothing happens.
    assert expire_orders(now=last + timedelta(seconds=grace - 1)) == 0
    assert Order.objects.get(pk=order.pk).state == "running"

    assert expire_orders(now=last + timedelta(seconds=grace + 1)) == 1
    order = Order.objects.select_related("hold", "job_peer").get(pk=order.pk)
    assert order.state == "failed"
    assert "offline since" in order.reason
    s = Settlement.objects.get(order=order)
    assert s.billed_seconds == 20 * 60  # ack to last heartbeat
    assert s.captured == 1000 * 20 * 60
    assert s.released == order.hold_amount - s.captured
    assert order.hold.state == EscrowHold.State.CAPTURED
    assert order.job_peer.state == JobPeer.State.REMOVING
    assert ledger.available_for(funded_buyer) == wallet + s.released
    assert ledger.frozen_for(provider) == s.provider_amount
    assert audit_ledger() == []

    # The node comes back and acknowledges the removal: nothing more happens to the order.
    heartbeat(node, timezone.now())
    ack(node)
    assert Order.objects.get(pk=order.pk).state == "failed"
    assert Settlement.objects.filter(order=order).count() == 1
    assert expire_orders(now=timezone.now() + timedelta(days=1)) == 0
    assert audit_ledger() == []


def test_a_stopping_order_on_a_lost_node_completes_billed_to_the_earlier_end(
    funded_buyer, listing, node, settings
):
    start = timezone.now() - timedelta(hours=1)
    heartbeat(node, start)
    order = running(funded_buyer, listing, node, started=start)
    online(node, start, start + timedelta(minutes=30))
    stop_order(order)  # stop requested now, but the node is already gone
    later = timezone.now() + timedelta(seconds=settings.MOLT_NODE_FAILURE_GRACE_SECONDS + 1)
    assert expire_orders(now=later) == 1
    order = Order.objects.get(pk=order.pk)
    assert order.state == "completed"
    assert Settlement.objects.get(order=order).billed_seconds == 30 * 60
    assert audit_ledger() == []


def test_a_node_that_was_never_heard_from_does_not_fail_orders(funded_buyer, listing, node):
    order = running(funded_buyer, listing, node, started=timezone.now() - timedelta(minutes=5))
    assert expire_orders(now=timezone.now() + timedelta(minutes=30)) == 0
    assert Order.objects.get(pk=order.pk).state == "running"


# --- the bandwidth allowance ---------------------------------------------------------------------

BOOT = wire.new_nonce()


def metering(identity, key, seq, rx, tx):
    body = wire.MeteringSample(
        node_id=identity.node_id,
        boot_id=BOOT,
        seq=seq,
        sampled_at=int(time.time()),
        peers=(wire.PeerCounters(public_key=key, epoch=0, rx_bytes=rx, tx_bytes=tx),),
    ).to_dict()
    return wire.signed_envelope(wire.METERING, body, identity)


def test_reaching_the_bandwidth_allowance_stops_the_job_with_that_reason(
    funded_buyer, listing, node, identity, settings
):
    settings.MOLT_BANDWIDTH_ALLOWANCE_GIB = 1
    order = running(funded_buyer, listing, node, started=timezone.now() - timedelta(minutes=10))
    assert order.bandwidth_allowance_bytes == billing.GIB
    key = order.wireguard_public_key

    ingest_metering(node, metering(identity, key, 1, 300 << 20, 600 << 20))
    assert Order.objects.get(pk=order.pk).state == "running"  # 900 MiB of 1024

    ingest_metering(node, metering(identity, key, 2, 400 << 20, 700 << 20))
    order = Order.objects.get(pk=order.pk)
    assert order.state == "stopping"
    assert order.reason == BANDWIDTH_USED_UP == "bandwidth allowance used up"
    assert order.bytes_in + order.bytes_out == 1100 << 20

    ack(node)
    s = Settlement.objects.get(order=order)
    assert s.bandwidth_bytes == 1100 << 20
    assert s.bandwidth_charge == 10_000 * 1100 // 1024
    assert s.captured <= order.hold_amount
    assert audit_ledger() == []


# --- a node lost for good ------------------------------------------------------------------------


def test_removals_a_node_lost_for_good_never_acknowledges_are_closed_out(
    funded_buyer, listing, node, settings
):
    from meshnet.models import IpAllocation, JobPeerKey

    start = timezone.now() - timedelta(days=10)
    heartbeat(node, start)
    order = running(funded_buyer, listing, node, started=start)
    last = start + timedelta(minutes=20)
    online(node, start, last)
    assert expire_orders(now=last + timedelta(hours=1)) == 1  # the grace: failed
    peer = JobPeer.objects.get(order=order)
    assert peer.state == JobPeer.State.REMOVING
    key = peer.public_key
    abandoned = settings.MOLT_NODE_ABANDONED_AFTER_SECONDS

    # Silent, but not yet for long enough: the removal waits for the agent.
    assert close_out_silent_nodes(now=last + timedelta(seconds=abandoned - 1)) == 0
    assert JobPeer.objects.get(pk=peer.pk).state == JobPeer.State.REMOVING

    assert close_out_silent_nodes(now=last + timedelta(seconds=abandoned + 1)) == 1
    peer.refresh_from_db()
    assert peer.state == JobPeer.State.REMOVED
    lease = IpAllocation.objects.get(pk=peer.allocation_id)
    assert lease.released_at is not None  # into quarantine, then reusable
    assert not JobPeerKey.objects.filter(job_peer=peer, closed_at__isnull=True).exists()
    assert close_out_silent_nodes(now=timezone.now()) == 0  # nothing left to close out
    order.refresh_from_db()
    assert order.state == "failed"
    assert Settlement.objects.filter(order=order).count() == 1

    # The key is free for another order now.
    other = place_order(
        funded_buyer, listing_id=listing.pk, gpu_count=1, hours=1, wireguard_public_key=key
    )
    provision_order(other.pk)
    assert Order.objects.get(pk=other.pk).state == "provisioning"

    # The node comes back and acknowledges the removal: nothing changes twice.
    heartbeat(node, timezone.now())
    ack(node)
    assert Order.objects.get(pk=order.pk).state == "failed"
    assert Settlement.objects.filter(order=order).count() == 1
    assert audit_ledger() == []


def test_a_node_heard_from_again_keeps_its_pending_removals(funded_buyer, listing, node, settings):
    start = timezone.now() - timedelta(days=10)
    heartbeat(node, start)
    order = running(funded_buyer, listing, node, started=start)
    stop_order(order)
    peer = JobPeer.objects.get(order=order)
    assert peer.state == JobPeer.State.REMOVING
    heartbeat(node, timezone.now())  # the agent is back: it will acknowledge the removal itself

    assert close_out_silent_nodes() == 0
    assert JobPeer.objects.get(pk=peer.pk).state == JobPeer.State.REMOVING


def test_a_revoked_node_is_left_to_revocation(funded_buyer, listing, node, settings):
    start = timezone.now() - timedelta(days=10)
    heartbeat(node, start)
    running(funded_buyer, listing, node, started=start)
    revoke_node(Node.objects.get(pk=node.pk))

    assert close_out_silent_nodes() == 0
