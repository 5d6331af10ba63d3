"""Multi-node orders (marketplace.clusters): one POST, one hold for the total, running when
every part is, billed per part, stop ends every part, a lost part ends or degrades the job as
the buyer chose. Through the real services, with the agents' acknowledgements and heartbeats
driven at explicit times; the ledger audit after every scenario."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from marketplace import billing, ledger
from marketplace.audit import audit_ledger
from marketplace.cluster_models import Cluster
from marketplace.clusters import (
    MAX_PARTS,
    PartSpec,
    cluster_members,
    end_after_loss,
    parts_of,
    place_cluster,
    state_of,
    stop_cluster,
    sweep_lost_clusters,
)
from marketplace.errors import InsufficientFunds, InvalidTransition, ListingUnavailable, MarketError
from marketplace.listings import create_listing
from marketplace.models import EscrowHold, LedgerTransaction, Order, Settlement
from marketplace.orders import end_orders_of_lost_nodes, provision_order, quote_for, stop_order
from marketplace.settlement import settle_order
from meshnet.agent_channel import acknowledge_revision
from meshnet.models import Node
from meshnet.nodes import record_heartbeat
from tests import factories
from tests.factories import USD

pytestmark = [pytest.mark.db, pytest.mark.django_db]

# Exactly 1000 micro-USD per GPU-second on A and 500 on B: billed seconds read off the charges.
PRICE_A = 3_600_000
PRICE_B = 1_800_000


@pytest.fixture
def listing_a(provider, node_a):
    return create_listing(
        provider, node=node_a, gpu_count=2, price_per_gpu_hour=PRICE_A, price_per_gib=10_000
    )


@pytest.fixture
def listing_b(carol, node_b):
    return create_listing(
        carol, node=node_b, gpu_count=4, price_per_gpu_hour=PRICE_B, price_per_gib=20_000
    )


def specs(*pairs) -> list[PartSpec]:
    return [PartSpec(listing=listing.pk, gpu_count=gpus) for listing, gpus in pairs]


def place(buyer, listing_a, listing_b, *, on_part_loss="end", hours=2) -> Cluster:
    return place_cluster(
        buyer,
        parts=specs((listing_a, 2), (listing_b, 3)),
        hours=hours,
        on_part_loss=on_part_loss,
        wireguard_public_key=factories.wg_public_key(),
    )


def ack(node, at=None) -> None:
    node.refresh_from_db()
    acknowledge_revision(node, node.desired_revision, at=at)


def provisioned(cluster: Cluster) -> list[Order]:
    for part in parts_of(cluster):
        provision_order(part.pk)
    return parts_of(cluster)


def hold_of(cluster: Cluster) -> EscrowHold:
    return EscrowHold.objects.select_related("account").get(cluster=cluster)


def running(buyer, listing_a, listing_b, node_a, node_b, *, started_a, started_b, **kw):
    cluster = place(buyer, listing_a, listing_b, **kw)
    provisioned(cluster)
    record_heartbeat(Node.objects.get(pk=node_a.pk), at=started_a)
    record_heartbeat(Node.objects.get(pk=node_b.pk), at=started_b)
    ack(node_a, at=started_a)
    ack(node_b, at=started_b)
    cluster.refresh_from_db()
    assert state_of(cluster) == "running"
    return cluster


# --- placing: one transaction, one hold for the total --------------------------------------------


def test_one_order_across_providers_and_regions_places_one_hold_for_the_total(
    funded_buyer, listing_a, listing_b
):
    before = ledger.available_for(funded_buyer)
    cluster = place(funded_buyer, listing_a, listing_b)
    a, b = parts_of(cluster)
    expected = [
        quote_for(listing_a, gpu_count=2, hours=2).total_hold,
        quote_for(listing_b, gpu_count=3, hours=2).total_hold,
    ]
    assert [a.hold_amount, b.hold_amount] == expected
    assert cluster.hold_amount == sum(expected)
    # One hold row, one HOLD transaction, one escrow account holding exactly the total.
    hold = hold_of(cluster)
    assert (hold.amount, hold.state, hold.account.balance) == (sum(expected), "open", sum(expected))
    assert not EscrowHold.objects.filter(order__in=[a, b]).exists()
    assert LedgerTransaction.objects.filter(kind="hold").count() == 1
    assert ledger.available_for(funded_buyer) == before - sum(expected)
    assert ledger.held_for(funded_buyer) == sum(expected)
    assert [(p.part_index, p.listing.region, p.state) for p in (a, b)] == [
        (0, "eu-west", "pending"),
        (1, "us-east", "pending"),
    ]
    assert state_of(cluster) == "pending"
    assert audit_ledger() == []


def test_funds_are_checked_once_for_the_total_and_a_refusal_writes_nothing(
    buyer, listing_a, listing_b
):
    total = (
        quote_for(listing_a, gpu_count=2, hours=2).total_hold
        + quote_for(listing_b, gpu_count=3, hours=2).total_hold
    )
    ledger.grant_credits(buyer, total - 1)  # enough for either part, not for both
    with pytest.raises(InsufficientFunds):
        place(buyer, listing_a, listing_b)
    assert not Cluster.objects.exists() and not Order.objects.exists()
    assert not EscrowHold.objects.exists()
    assert ledger.available_for(buyer) == total - 1
    ledger.grant_credits(buyer, 1)
    place(buyer, listing_a, listing_b)
    assert ledger.available_for(buyer) == 0
    assert audit_ledger() == []


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda s: [*s, PartSpec(s[0].listing, 1)], "parts[2].listing"),
        (lambda s: [s[0], PartSpec(s[1].listing, 0)], None),
        (lambda s: [s[0], PartSpec(10**9, 1)], "parts[1].listing"),
        (lambda s: [s[0], PartSpec(s[1].listing, 9)], None),
        (lambda s: [], "parts"),
    ],
    ids=["duplicate-listing", "no-gpus", "unknown-listing", "oversold", "empty"],
)
def test_a_bad_part_is_refused_naming_its_field_and_nothing_is_written(
    funded_buyer, listing_a, listing_b, change, field
):
    parts = change(specs((listing_a, 1), (listing_b, 1)))
    with pytest.raises(MarketError) as refused:
        place_cluster(
            funded_buyer,
            parts=parts,
            hours=1,
            on_part_loss="end",
            wireguard_public_key=factories.wg_public_key(),
        )
    if field is None:
        assert refused.value.field.startswith("parts[1].")
    else:
        assert refused.value.field == field
    assert not Cluster.objects.exists() and not Order.objects.exists()
    assert audit_ledger() == []


def test_at_most_max_parts_and_never_the_buyers_own_listing(
    funded_buyer, provider, listing_a, listing_b
):
    too_many = [PartSpec(listing_a.pk + i, 1) for i in range(17)]
    assert len(too_many) == MAX_PARTS + 1
    with pytest.raises(MarketError) as refused:
        place_cluster(
            funded_buyer,
            parts=too_many,
            hours=1,
            on_part_loss="end",
            wireguard_public_key=factories.wg_public_key(),
        )
    assert refused.value.field == "parts"
    ledger.grant_credits(provider, 1000 * USD)
    with pytest.raises(ListingUnavailable) as own:
        place_cluster(
            provider,
            parts=specs((listing_b, 1), (listing_a, 1)),
            hours=1,
            on_part_loss="end",
            wireguard_public_key=factories.wg_public_key(),
        )
    assert own.value.field == "parts[1].listing"
    assert not Cluster.objects.exists()


# --- running, billing per part, stop -------------------------------------------------------------


def test_the_job_runs_only_when_every_part_is_ready_and_each_part_bills_from_its_own_start(
    funded_buyer, listing_a, listing_b, node_a, node_b
):
    cluster = place(funded_buyer, listing_a, listing_b)
    a, b = provisioned(cluster)
    assert state_of(cluster) == "provisioning"
    t_a = timezone.now() - timedelta(hours=1)
    ack(node_a, at=t_a)
    a, b = parts_of(cluster)
    assert (a.state, b.state) == ("running", "provisioning")
    assert state_of(cluster) == "provisioning"
    t_b = t_a + timedelta(minutes=30)
    ack(node_b, at=t_b)
    a, b = parts_of(cluster)
    assert state_of(cluster) == "running"
    assert (a.running_since, b.running_since) == (t_a, t_b)
    members = cluster_members(cluster.pk)
    assert {(m.part_index, m.node_id) for m in members} == {(0, node_a.pk), (1, node_b.pk)}
    assert {m.address for m in members} == {a.job_peer.address, b.job_peer.address}
    assert audit_ledger() == []


def test_stop_ends_every_part_each_billed_exactly_and_the_rest_is_released_once(
    funded_buyer, listing_a, listing_b, node_a, node_b
):
    now = timezone.now()
    t_a, t_b = now - timedelta(seconds=3000), now - timedelta(seconds=1200)
    cluster = running(
        funded_buyer, listing_a, listing_b, node_a, node_b, started_a=t_a, started_b=t_b
    )
    wallet_before = ledger.available_for(funded_buyer)
    stop_cluster(cluster)
    a, b = parts_of(cluster)
    assert (a.state, b.state) == ("stopping", "stopping")
    assert state_of(cluster) == "stopping"
    assert cluster_members(cluster.pk) == frozenset()
    with pytest.raises(InvalidTransition):
        stop_cluster(cluster)
    assert audit_ledger() == []

    ack(node_a)  # node A dropped its part: part A settles, the hold stays open for B
    a, b = parts_of(cluster)
    assert (a.state, b.state) == ("completed", "stopping")
    seconds_a = int((a.stop_requested_at - t_a).total_seconds())
    sa = Settlement.objects.get(order=a)
    assert sa.billed_seconds == seconds_a
    assert sa.captured == billing.time_charge(
        price_per_gpu_hour=PRICE_A, gpu_count=2, seconds=seconds_a
    )
    assert sa.captured == 2 * 1000 * seconds_a  # 1000 micro-USD per GPU-second on A
    assert sa.fee + sa.provider_amount == sa.captured
    hold = hold_of(cluster)
    assert hold.state == "open"
    assert hold.account.balance == cluster.hold_amount - sa.captured
    assert ledger.held_for(funded_buyer) == cluster.hold_amount - sa.captured
    assert audit_ledger() == []

    ack(node_b)
    b = parts_of(cluster)[1]
    seconds_b = int((b.stop_requested_at - t_b).total_seconds())
    sb = Settlement.objects.get(order=b)
    assert sb.captured == 3 * 500 * seconds_b
    hold = hold_of(cluster)
    assert (hold.state, hold.account.balance) == ("captured", 0)
    release = LedgerTransaction.objects.get(resolves_hold=hold)
    assert release.kind == "release"
    assert ledger.available_for(funded_buyer) == (
        wallet_before + cluster.hold_amount - sa.captured - sb.captured
    )
    assert ledger.held_for(funded_buyer) == 0
    assert state_of(cluster) == "completed"
    assert LedgerTransaction.objects.filter(kind="part_cap").count() == 2
    assert audit_ledger() == []


def test_stop_before_running_cancels_every_part_and_releases_the_whole_hold(
    funded_buyer, listing_a, listing_b, node_a
):
    before = ledger.available_for(funded_buyer)
    cluster = place(funded_buyer, listing_a, listing_b)
    provision_order(parts_of(cluster)[0].pk)  # one provisioning, one still pending
    stop_cluster(cluster)
    assert [p.state for p in parts_of(cluster)] == ["cancelled", "cancelled"]
    assert state_of(cluster) == "cancelled"
    hold = hold_of(cluster)
    assert (hold.state, hold.account.balance) == ("released", 0)
    assert ledger.available_for(funded_buyer) == before
    assert not Settlement.objects.exists()
    assert audit_ledger() == []


def test_a_part_stopped_on_its_own_leaves_the_others_running(
    funded_buyer, listing_a, listing_b, node_a, node_b
):
    now = timezone.now()
    cluster = running(
        funded_buyer,
        listing_a,
        listing_b,
        node_a,
        node_b,
        started_a=now - timedelta(minutes=5),
        started_b=now - timedelta(minutes=5),
    )
    stop_order(parts_of(cluster)[0])  # the buyer's own choice: no loss
    ack(node_a)
    assert [p.state for p in parts_of(cluster)] == ["completed", "running"]
    assert state_of(cluster) == "degraded"
    assert hold_of(cluster).state == "open"
    assert audit_ledger() == []


def test_a_part_cancelled_before_it_ran_is_never_settled_while_the_others_live(
    funded_buyer, listing_a, listing_b
):
    """A retried settlement (the sweep, a redelivered task) of a part cancelled before it ran:
    the cluster's hold is still open for the other part, so only settle_order's own rule stops
    an empty part capture and a Settlement for an order that never ran (found by the ledger's
    property machine: "cancelled ... assert 161 is None")."""
    cluster = place(funded_buyer, listing_a, listing_b)
    first, _ = provisioned(cluster)
    stop_order(first)
    assert [p.state for p in parts_of(cluster)] == ["cancelled", "provisioning"]
    assert hold_of(cluster).state == "open"

    with pytest.raises(InvalidTransition, match="cancelled"):
        settle_order(Order.objects.get(pk=first.pk))

    assert not Settlement.objects.filter(order=first).exists()
    assert not LedgerTransaction.objects.filter(kind=LedgerTransaction.Kind.PART_CAPTURE).exists()
    assert audit_ledger() == []


# --- a lost part: end or degrade -----------------------------------------------------------------


def online(node, start, end, every=timedelta(seconds=15)) -> None:
    """The agent's heartbeats from `start` to `end`, as a live agent sends them."""
    at = start
    while at < end:
        record_heartbeat(Node.objects.get(pk=node.pk), at=at)
        at += every
    record_heartbeat(Node.objects.get(pk=node.pk), at=end)


def lose_node_a(node_a, t0, settings):
    """Node A was online from t0 for 5 minutes, then silent for 20; the sweep runs past the
    grace. Returns its last heartbeat."""
    last = t0 + timedelta(minutes=5)
    online(node_a, t0, last)
    assert settings.MOLT_NODE_FAILURE_GRACE_SECONDS < 20 * 60
    assert end_orders_of_lost_nodes() == 1
    return last


def test_a_part_lost_past_the_grace_ends_the_whole_job_when_the_buyer_chose_end(
    funded_buyer, listing_a, listing_b, node_a, node_b, settings
):
    now = timezone.now()
    t0 = now - timedelta(minutes=25)
    cluster = running(
        funded_buyer, listing_a, listing_b, node_a, node_b, started_a=t0, started_b=t0
    )
    record_heartbeat(Node.objects.get(pk=node_b.pk), at=now)
    last = lose_node_a(node_a, t0, settings)
    cluster.refresh_from_db()
    a, b = parts_of(cluster)
    assert (a.state, b.state) == ("failed", "running")
    assert cluster.ended_by_loss_at is not None and "failed" in cluster.reason
    assert state_of(cluster) == "stopping"
    # Part A is billed up to its node's last heartbeat, at once.
    assert Settlement.objects.get(order=a).captured == 2 * 1000 * 300
    assert last - t0 == timedelta(seconds=300)
    assert audit_ledger() == []

    # The after-commit task (or the sweep, had it been lost) stops the others.
    assert sweep_lost_clusters() == 1
    assert end_after_loss(cluster.pk) == 0  # idempotent
    assert parts_of(cluster)[1].state == "stopping"
    ack(node_b)
    a, b = parts_of(cluster)
    assert b.state == "completed"
    assert state_of(cluster) == "failed"
    hold = hold_of(cluster)
    assert (hold.state, hold.account.balance) == ("captured", 0)
    assert ledger.held_for(funded_buyer) == 0
    assert audit_ledger() == []


def test_a_part_lost_past_the_grace_leaves_the_rest_running_and_billing_under_degrade(
    funded_buyer, listing_a, listing_b, node_a, node_b, settings
):
    now = timezone.now()
    t0 = now - timedelta(minutes=25)
    cluster = running(
        funded_buyer,
        listing_a,
        listing_b,
        node_a,
        node_b,
        started_a=t0,
        started_b=t0,
        on_part_loss="degrade",
    )
    online(node_b, t0, now, every=timedelta(seconds=30))
    lose_node_a(node_a, t0, settings)
    cluster.refresh_from_db()
    assert cluster.ended_by_loss_at is None
    assert [p.state for p in parts_of(cluster)] == ["failed", "running"]
    assert state_of(cluster) == "degraded"
    assert sweep_lost_clusters() == 0
    assert {m.part_index for m in cluster_members(cluster.pk)} == {1}
    hold = hold_of(cluster)
    captured_a = Settlement.objects.get(order=parts_of(cluster)[0]).captured
    assert captured_a == 2 * 1000 * 300
    assert hold.state == "open" and hold.account.balance == cluster.hold_amount - captured_a
    assert audit_ledger() == []

    stop_cluster(cluster)  # stops what is left: part B
    ack(node_b)
    b = parts_of(cluster)[1]
    assert b.state == "completed"
    assert Settlement.objects.get(order=b).captured == 3 * 500 * int(
        (b.stop_requested_at - t0).total_seconds()
    )
    assert state_of(cluster) == "completed"
    assert hold_of(cluster).state == "captured"
    assert audit_ledger() == []


def test_a_part_that_fails_to_provision_under_end_cancels_the_others_and_bills_nothing(
    funded_buyer, listing_a, listing_b, node_a, settings
):
    from marketplace.orders import fail_order

    before = ledger.available_for(funded_buyer)
    cluster = place(funded_buyer, listing_a, listing_b)
    _a, b = provisioned(cluster)
    fail_order(b, "provider node revoked: test")
    cluster.refresh_from_db()
    assert cluster.ended_by_loss_at is not None
    assert end_after_loss(cluster.pk) == 1
    assert [p.state for p in parts_of(cluster)] == ["cancelled", "failed"]
    assert state_of(cluster) == "failed"
    assert hold_of(cluster).state == "released"
    assert ledger.available_for(funded_buyer) == before
    assert audit_ledger() == []


# --- the audit sees a cluster hold that does not add up ------------------------------------------


def test_the_audit_reports_a_cluster_whose_parts_ended_with_its_hold_open(
    funded_buyer, listing_a, listing_b
):
    cluster = place(funded_buyer, listing_a, listing_b)
    # Behind the services' back: the parts end, the hold is left open.
    Order.objects.filter(cluster=cluster).update(state="cancelled")
    assert f"cluster {cluster.pk} ended but its hold is still open" in audit_ledger()


# --- sandboxes: every part's must be ready; the mesh hook lists their addresses -----------------


def test_with_sandboxes_the_job_runs_when_every_parts_sandbox_is_ready_and_members_are_them(
    funded_buyer, provider, carol, node_a, node_b
):
    factories.ssh_key(funded_buyer)
    sa = factories.sandbox_listing(provider, node_a, gpu_count=2, price_per_gpu_hour=PRICE_A)
    sb = factories.sandbox_listing(carol, node_b, gpu_count=4, price_per_gpu_hour=PRICE_B)
    cluster = place_cluster(
        funded_buyer,
        parts=specs((sa, 1), (sb, 2)),
        hours=1,
        on_part_loss="degrade",
        wireguard_public_key=factories.wg_public_key(),
    )
    a, b = provisioned(cluster)
    assert a.image == factories.SANDBOX_IMAGE and b.ssh_keys == a.ssh_keys
    ack(node_a)
    ack(node_b)
    assert [p.state for p in parts_of(cluster)] == ["provisioning", "provisioning"]
    factories.report_sandbox(a.pk, state="ready", ready_at=timezone.now())
    assert [p.state for p in parts_of(cluster)] == ["running", "provisioning"]
    assert state_of(cluster) == "provisioning"
    factories.report_sandbox(b.pk, state="ready", ready_at=timezone.now())
    assert state_of(cluster) == "running"
    from meshnet.models import Sandbox

    sandboxes = {s.ref: s for s in Sandbox.objects.all()}
    members = sorted(cluster_members(cluster.pk))
    assert [(m.part_index, m.node_id, m.address) for m in members] == [
        (0, node_a.pk, str(sandboxes[f"order:{a.pk}"].address)),
        (1, node_b.pk, str(sandboxes[f"order:{b.pk}"].address)),
    ]
    assert audit_ledger() == []
