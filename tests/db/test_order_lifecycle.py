"""An order's life through the real services, with the agent's acknowledgements driven through
meshnet.agent_channel.acknowledge_revision (the path the agent's consumer calls) at explicit times.

pending -> provisioning -> running -> stopping -> completed (settled), and the side roads:
cancel, expiry, provisioning timeout; plus the job address it gets from the jobs block.
"""

from __future__ import annotations

import ipaddress
import time
from datetime import timedelta
from unittest import mock

import pytest
from django.utils import timezone

from marketplace import billing, ledger
from marketplace.audit import audit_ledger
from marketplace.errors import (
    InsufficientFunds,
    InvalidTransition,
    ListingUnavailable,
    MarketError,
    Oversold,
)
from marketplace.models import (
    Account,
    EscrowHold,
    LedgerTransaction,
    Order,
    OrderTransition,
    Settlement,
)
from marketplace.orders import (
    complete_order,
    expire_orders,
    place_order,
    provision_order,
    stop_order,
)
from marketplace.settlement import settle_order
from meshnet import ipplan
from meshnet.agent_channel import acknowledge_revision
from meshnet.allocation import allocate_address, allocate_node_address, release_address
from meshnet.errors import PoolExhausted, UnknownRegion
from meshnet.models import IpAllocation, IpPool, JobPeer
from tests import factories
from tests.factories import USD

pytestmark = [pytest.mark.db, pytest.mark.django_db]

PRICE = 2 * USD  # per GPU-hour
PRICE_GIB = 10_000
MESH = ipaddress.IPv4Network("10.100.0.0/16")  # every node block
JOBS = ipaddress.IPv4Network("10.64.0.0/11")  # buyers' job tunnel addresses


def place(buyer, listing, *, gpu_count=1, hours=2, key=None) -> Order:
    return place_order(
        buyer,
        listing_id=listing.pk,
        gpu_count=gpu_count,
        hours=hours,
        wireguard_public_key=key or factories.wg_public_key(),
    )


def ack(node, at=None) -> None:
    """The agent applied everything up to the node's current desired revision."""
    node.refresh_from_db()
    acknowledge_revision(node, node.desired_revision, at=at)


def reload(order: Order) -> Order:
    return Order.objects.select_related("hold", "job_peer").get(pk=order.pk)


def transitions(order: Order) -> list[tuple[str, str]]:
    return list(OrderTransition.objects.filter(order=order).values_list("from_state", "to_state"))


def wallet(user) -> int:
    return ledger.available_for(user)


def test_full_lifecycle_bills_the_time_between_ack_and_stop_and_settles_once(
    funded_buyer, provider, node, listing, settings
):
    order = place(funded_buyer, listing, gpu_count=2, hours=3)
    hold = order.hold.amount
    assert hold == PRICE * 2 * 3 + PRICE_GIB * settings.MOLT_BANDWIDTH_ALLOWANCE_GIB
    assert reload(order).state == "pending"

    provision_order(order.pk)
    order = reload(order)
    assert order.state == "provisioning"
    assert order.job_peer.state == JobPeer.State.DESIRED
    assert ipaddress.IPv4Address(order.job_peer.address) in JOBS

    started = timezone.now() - timedelta(minutes=90)
    ack(node, at=started)
    order = reload(order)
    assert order.state == "running"
    assert order.running_since == started
    assert order.ends_at == started + timedelta(hours=3)
    assert order.job_peer.state == JobPeer.State.ACTIVE

    stop_order(order)
    order = reload(order)
    assert order.state == "stopping"
    assert order.job_peer.state == JobPeer.State.REMOVING
    stopped = order.stop_requested_at
    assert stopped is not None

    removed_at = timezone.now()
    ack(node, at=removed_at)
    order = reload(order)
    assert order.state == "completed"
    assert order.ended_at == removed_at
    assert order.job_peer.state == JobPeer.State.REMOVED

    settlement = Settlement.objects.get(order=order)
    expected_seconds = int((stopped - started).total_seconds())
    assert 90 * 60 <= expected_seconds < 90 * 60 + 60
    assert settlement.billed_seconds == expected_seconds
    assert settlement.time_charge == PRICE * 2 * expected_seconds // 3600
    assert settlement.bandwidth_charge == 0
    assert settlement.captured == settlement.time_charge
    assert settlement.fee == settlement.captured * settings.MOLT_PLATFORM_FEE_BPS // 10_000
    assert settlement.captured + settlement.released == hold
    assert settlement.fee + settlement.provider_amount == settlement.captured
    assert settlement.transaction.kind == LedgerTransaction.Kind.CAPTURE
    assert settlement.transaction.resolves_hold_id == order.hold.pk
    assert order.hold.state == EscrowHold.State.CAPTURED

    assert wallet(funded_buyer) == 1000 * USD - settlement.captured
    # The provider's share is frozen for the dispute window, not yet earnings.
    assert ledger.frozen_for(provider) == settlement.provider_amount
    assert ledger.earnings_account(provider).balance == 0
    assert ledger.fees_account().balance == settlement.fee
    assert ledger.held_for(funded_buyer) == 0

    assert transitions(order) == [
        ("", "pending"),
        ("pending", "provisioning"),
        ("provisioning", "running"),
        ("running", "stopping"),
        ("stopping", "completed"),
    ]
    assert audit_ledger() == []


def test_bandwidth_is_billed_at_the_listing_price_per_gib(funded_buyer, node, listing):
    order = place(funded_buyer, listing, hours=1)
    provision_order(order.pk)
    ack(node, at=timezone.now() - timedelta(minutes=30))
    Order.objects.filter(pk=order.pk).update(bytes_in=3 * billing.GIB, bytes_out=billing.GIB // 2)
    stop_order(reload(order))
    ack(node)
    settlement = Settlement.objects.get(order=order)
    assert settlement.bandwidth_bytes == 3 * billing.GIB + billing.GIB // 2
    assert settlement.bandwidth_charge == 35_000
    assert settlement.captured == settlement.time_charge + 35_000
    assert audit_ledger() == []


def test_repeated_and_stale_acks_change_nothing(funded_buyer, node, listing):
    order = place(funded_buyer, listing)
    provision_order(order.pk)
    started = timezone.now() - timedelta(minutes=5)
    ack(node, at=started)
    ack(node, at=timezone.now())  # a repeat
    acknowledge_revision(node, 0, at=timezone.now())  # stale
    order = reload(order)
    assert order.running_since == started
    assert len(transitions(order)) == 3
    with pytest.raises(ValueError, match="ahead of desired revision"):
        acknowledge_revision(node, reload(order).listing.node.desired_revision + 1)


def test_settlement_happens_exactly_once(funded_buyer, node, listing):
    order = place(funded_buyer, listing)
    provision_order(order.pk)
    ack(node, at=timezone.now() - timedelta(minutes=10))
    stop_order(reload(order))
    ack(node)
    first = Settlement.objects.get(order=order)
    balances = list(Account.objects.order_by("pk").values_list("balance", flat=True))

    again = settle_order(reload(order))
    assert again.pk == first.pk
    assert complete_order(reload(order), timezone.now()) is False
    ack(node)

    assert Settlement.objects.filter(order=order).count() == 1
    resolutions = LedgerTransaction.objects.filter(resolves_hold=order.hold)
    assert resolutions.count() == 1
    assert LedgerTransaction.objects.filter(kind=LedgerTransaction.Kind.CAPTURE).count() == 1
    assert list(Account.objects.order_by("pk").values_list("balance", flat=True)) == balances
    assert audit_ledger() == []


def test_settling_a_live_order_is_refused(funded_buyer, node, listing):
    order = place(funded_buyer, listing)
    provision_order(order.pk)
    ack(node, at=timezone.now() - timedelta(minutes=10))
    with pytest.raises(InvalidTransition):
        settle_order(reload(order))
    assert reload(order).hold.state == EscrowHold.State.OPEN
    assert not Settlement.objects.filter(order=order).exists()
    assert audit_ledger() == []


def test_stop_of_an_ended_order_is_refused(funded_buyer, listing):
    order = place(funded_buyer, listing)
    stop_order(order)
    with pytest.raises(InvalidTransition, match="already cancelled"):
        stop_order(reload(order))
    assert len(transitions(order)) == 2


def test_cancel_while_pending_releases_the_hold_in_full(funded_buyer, listing):
    order = place(funded_buyer, listing)
    assert wallet(funded_buyer) == 1000 * USD - order.hold.amount
    stop_order(order)
    order = reload(order)
    assert order.state == "cancelled"
    assert order.ended_at is not None
    assert order.hold.state == EscrowHold.State.RELEASED
    assert wallet(funded_buyer) == 1000 * USD
    assert not Settlement.objects.filter(order=order).exists()
    assert transitions(order) == [("", "pending"), ("pending", "cancelled")]
    # A task that arrives late does nothing to a cancelled order.
    provision_order(order.pk)
    assert reload(order).job_peer is None
    assert audit_ledger() == []


def test_cancel_while_provisioning_releases_the_hold_and_drops_the_peer(
    funded_buyer, node, listing
):
    order = place(funded_buyer, listing)
    provision_order(order.pk)
    stop_order(reload(order))
    order = reload(order)
    assert order.state == "cancelled"
    assert order.job_peer.state == JobPeer.State.REMOVING
    assert wallet(funded_buyer) == 1000 * USD
    ack(node)  # the agent confirms the peer is gone; the order stays cancelled, unbilled
    order = reload(order)
    assert order.state == "cancelled"
    assert order.job_peer.state == JobPeer.State.REMOVED
    assert transitions(order) == [
        ("", "pending"),
        ("pending", "provisioning"),
        ("provisioning", "cancelled"),
    ]
    assert audit_ledger() == []


def test_expiry_stops_a_run_past_its_booked_time_and_bills_exactly_the_booking(
    funded_buyer, node, listing, settings
):
    order = place(funded_buyer, listing, gpu_count=1, hours=1)
    started = timezone.now() - timedelta(hours=1, minutes=5)
    provision_order(order.pk)
    ack(node, at=started)
    assert expire_orders() == 1
    order = reload(order)
    assert order.state == "stopping"
    assert order.reason == "booked time is up"
    assert expire_orders() == 0  # nothing left to expire
    ack(node)
    settlement = Settlement.objects.get(order=order)
    assert settlement.billed_seconds == 3600  # the booking, not the five minutes past it
    assert settlement.time_charge == PRICE
    assert settlement.released == PRICE_GIB * settings.MOLT_BANDWIDTH_ALLOWANCE_GIB
    assert audit_ledger() == []


def test_expiry_leaves_a_run_within_its_booking_alone(funded_buyer, node, listing):
    order = place(funded_buyer, listing, hours=2)
    provision_order(order.pk)
    ack(node, at=timezone.now() - timedelta(hours=1))
    assert expire_orders() == 0
    assert reload(order).state == "running"


def test_provisioning_without_an_ack_fails_after_the_timeout_and_releases_the_hold(
    funded_buyer, node, listing, settings
):
    order = place(funded_buyer, listing)
    provision_order(order.pk)
    timeout = timedelta(seconds=settings.MOLT_PROVISIONING_TIMEOUT_SECONDS)
    assert expire_orders(now=timezone.now() + timeout / 2) == 0
    assert reload(order).state == "provisioning"

    assert expire_orders(now=timezone.now() + timeout + timedelta(seconds=1)) == 1
    order = reload(order)
    assert order.state == "failed"
    assert order.hold.state == EscrowHold.State.RELEASED
    assert order.job_peer.state == JobPeer.State.REMOVING
    assert wallet(funded_buyer) == 1000 * USD
    assert transitions(order)[-1] == ("provisioning", "failed")
    # A late ack of the (already removed) peer cannot start billing.
    ack(node, at=timezone.now())
    assert reload(order).state == "failed"
    assert audit_ledger() == []


def test_each_change_writes_one_transition_row(funded_buyer, node, listing):
    order = place(funded_buyer, listing)
    provision_order(order.pk)
    provision_order(order.pk)  # a retried task
    ack(node, at=timezone.now())
    ack(node, at=timezone.now())
    rows = list(OrderTransition.objects.filter(order=order))
    assert [(r.from_state, r.to_state) for r in rows] == [
        ("", "pending"),
        ("pending", "provisioning"),
        ("provisioning", "running"),
    ]
    assert all(r.reason for r in rows)


def test_orders_beyond_the_listings_free_gpus_are_refused(funded_buyer, stranger, listing):
    ledger.grant_credits(stranger, 1000 * USD)
    place(funded_buyer, listing, gpu_count=3)
    before = Order.objects.count()
    with pytest.raises(Oversold, match="only 1 of 4"):
        place(stranger, listing, gpu_count=2)
    assert Order.objects.count() == before
    place(stranger, listing, gpu_count=1)  # the last free one is fine


def test_gpus_of_an_ended_order_are_free_again(funded_buyer, listing):
    order = place(funded_buyer, listing, gpu_count=4)
    with pytest.raises(Oversold):
        place(funded_buyer, listing, gpu_count=1)
    stop_order(order)
    place(funded_buyer, listing, gpu_count=4)


def test_a_provider_cannot_order_their_own_listing(provider, listing):
    ledger.grant_credits(provider, 1000 * USD)
    with pytest.raises(ListingUnavailable):
        place(provider, listing)
    assert Order.objects.count() == 0


def test_insufficient_funds_refuses_the_order_and_writes_nothing(buyer, listing):
    ledger.grant_credits(buyer, 1 * USD)
    counts = (
        Order.objects.count(),
        OrderTransition.objects.count(),
        EscrowHold.objects.count(),
        Account.objects.count(),
        LedgerTransaction.objects.count(),
    )
    with pytest.raises(InsufficientFunds):
        place(buyer, listing)
    assert counts == (
        Order.objects.count(),
        OrderTransition.objects.count(),
        EscrowHold.objects.count(),
        Account.objects.count(),
        LedgerTransaction.objects.count(),
    )
    assert wallet(buyer) == 1 * USD


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"gpu_count": 0}, "gpu_count"),
        ({"hours": 0}, "hours"),
        ({"hours": 10**6}, "hours"),
        ({"key": "not base64!"}, "wireguard_public_key"),
    ],
)
def test_bad_order_input_names_the_field_and_writes_nothing(funded_buyer, listing, changes, field):
    with pytest.raises(MarketError) as err:
        place(funded_buyer, listing, **changes)
    assert err.value.field == field
    assert Order.objects.count() == 0


def test_a_key_on_a_live_order_cannot_be_reused(funded_buyer, listing):
    key = factories.wg_public_key()
    first = place(funded_buyer, listing, key=key)
    with pytest.raises(MarketError) as err:
        place(funded_buyer, listing, key=key)
    assert err.value.field == "wireguard_public_key"
    stop_order(first)
    place(funded_buyer, listing, key=key)  # the first order ended: the key is free


def test_job_addresses_come_from_the_jobs_block_and_are_unique(funded_buyer, node, listing):
    # The node enrolled in eu-west: its address came from that region's block.
    node_pool = IpPool.objects.get(name="eu-west")
    molt_before = node_pool.next_offset
    orders = [place(funded_buyer, listing) for _ in range(4)]
    for order in orders:
        provision_order(order.pk)
    addresses = [reload(o).job_peer.address for o in orders]
    assert len(set(addresses)) == 4
    assert node.mesh_address not in addresses
    for address in addresses:
        ip = ipaddress.IPv4Address(address)
        assert ip in JOBS and ip not in MESH
        assert ip not in (JOBS.network_address, JOBS.broadcast_address)
    leases = IpAllocation.objects.filter(address__in=addresses)
    assert {lease.purpose for lease in leases} == {IpAllocation.Purpose.JOB}
    assert {lease.pool.name for lease in leases} == {ipplan.JOB_BLOCK}
    # Job starts take nothing from the nodes' pool.
    assert IpPool.objects.get(pk=node_pool.pk).next_offset == molt_before
    assert not IpPool.objects.filter(name=ipplan.MOLT_POOL).exists()


def test_a_finished_jobs_address_goes_into_quarantine(funded_buyer, node, listing, settings):
    # The job block's own setting, not the nodes' one.
    settings.MOLT_JOB_ADDRESS_QUARANTINE_SECONDS = 300
    settings.MOLT_ADDRESS_QUARANTINE_SECONDS = 7
    order = place(funded_buyer, listing)
    provision_order(order.pk)
    ack(node, at=timezone.now())
    stop_order(reload(order))
    ack(node)
    lease = reload(order).job_peer.allocation
    assert lease.released_at is not None
    assert lease.reusable_after - lease.released_at == timedelta(seconds=300)
    # The next job gets another address.
    other = place(funded_buyer, listing)
    provision_order(other.pk)
    assert reload(other).job_peer.address != lease.address


def test_once_the_jobs_block_has_wrapped_a_released_address_goes_to_the_next_job(
    funded_buyer, node, listing, settings
):
    # The removed peer lets go of its reused lease row (one-to-one): before, the next peer's
    # insert failed once the pool wrapped, and the order failed as "key in use".
    settings.MOLT_JOB_ADDRESS_QUARANTINE_SECONDS = 0
    order = place(funded_buyer, listing)
    provision_order(order.pk)
    ack(node, at=timezone.now())
    stop_order(reload(order))
    ack(node)
    old = reload(order).job_peer
    assert old.allocation.released_at is not None
    IpPool.objects.filter(name=ipplan.JOB_BLOCK).update(next_offset=2_097_151)  # wrapped

    other = place(funded_buyer, listing)
    provision_order(other.pk)

    other = reload(other)
    assert other.state == "provisioning", other.reason
    assert other.job_peer.address == old.address
    old.refresh_from_db()
    assert old.allocation_id is None and other.job_peer.allocation_id is not None


# --- the pool itself, on a tiny block ------------------------------------------------------


@pytest.fixture
def tiny_pool(db):
    """A /29 pool (6 usable addresses) under a test name; allocate_address reads its cidr from
    the row, so the IP plan need not know it."""
    return IpPool.objects.create(name="test-tiny", cidr="10.100.200.0/29")


def test_a_pool_hands_out_each_usable_address_once_then_is_exhausted(tiny_pool):
    leases = [allocate_address("test-tiny", IpAllocation.Purpose.JOB) for _ in range(6)]
    assert [lease.address for lease in leases] == [f"10.100.200.{i}" for i in range(1, 7)]
    with pytest.raises(PoolExhausted) as err:
        allocate_address("test-tiny", IpAllocation.Purpose.JOB)
    assert err.value.status_code == 409
    assert err.value.pool_name == "test-tiny"
    assert "'test-tiny' is exhausted" in str(err.value)
    assert IpAllocation.objects.filter(pool=tiny_pool).count() == 6


def test_a_released_address_is_not_reused_during_quarantine(tiny_pool, settings):
    settings.MOLT_JOB_ADDRESS_QUARANTINE_SECONDS = 3600  # job leases: the job block's setting
    leases = [allocate_address("test-tiny", IpAllocation.Purpose.JOB) for _ in range(6)]
    release_address(leases[2])
    with pytest.raises(PoolExhausted):
        allocate_address("test-tiny", IpAllocation.Purpose.JOB)


def test_a_released_address_is_reused_after_quarantine_oldest_first(tiny_pool, settings):
    settings.MOLT_JOB_ADDRESS_QUARANTINE_SECONDS = 1
    leases = [allocate_address("test-tiny", IpAllocation.Purpose.JOB) for _ in range(6)]
    release_address(leases[4])
    time.sleep(0.05)
    release_address(leases[1])
    release_address(leases[1])  # a second release changes nothing
    with pytest.raises(PoolExhausted):
        allocate_address("test-tiny", IpAllocation.Purpose.JOB)
    time.sleep(1.1)
    first = allocate_address("test-tiny", IpAllocation.Purpose.NODE)
    second = allocate_address("test-tiny", IpAllocation.Purpose.JOB)
    assert (first.address, second.address) == (leases[4].address, leases[1].address)
    assert first.pk == leases[4].pk  # the lease row is reused; (pool, address) stays unique
    assert first.released_at is None and first.reusable_after is None
    assert first.purpose == IpAllocation.Purpose.NODE
    with pytest.raises(PoolExhausted):
        allocate_address("test-tiny", IpAllocation.Purpose.JOB)


def test_releasing_a_lease_again_keeps_its_first_quarantine(tiny_pool, settings):
    # A second release (an order's cleanup run twice) must not restart the quarantine: the
    # address would come back later than the first release promised, and out of its turn.
    settings.MOLT_JOB_ADDRESS_QUARANTINE_SECONDS = 60
    lease = allocate_address("test-tiny", IpAllocation.Purpose.JOB)
    first = timezone.now()
    with mock.patch("django.utils.timezone.now", return_value=first):
        release_address(lease)
    with mock.patch("django.utils.timezone.now", return_value=first + timedelta(hours=1)):
        release_address(lease)
    lease.refresh_from_db()
    assert (lease.released_at, lease.reusable_after) == (first, first + timedelta(seconds=60))


def test_a_node_address_for_a_region_the_plan_lacks_is_refused_naming_it(db):
    with pytest.raises(UnknownRegion) as refused:
        allocate_node_address("mars")
    assert str(refused.value).startswith("unknown region 'mars'; one of ")
    assert "eu-west" in str(refused.value)
    assert not IpAllocation.objects.exists()


def test_a_full_pool_never_reuses_a_released_address_of_another_pool(tiny_pool, settings):
    # The reuse query is of this pool's leases only: without its pool filter, a full pool took
    # another pool's released lease and handed out an address outside its own block.
    settings.MOLT_JOB_ADDRESS_QUARANTINE_SECONDS = 0
    other = IpPool.objects.create(name="test-other", cidr="10.100.201.0/29")
    released = allocate_address("test-other", IpAllocation.Purpose.JOB)
    release_address(released)
    for _ in range(6):
        allocate_address("test-tiny", IpAllocation.Purpose.JOB)
    with pytest.raises(PoolExhausted):
        allocate_address("test-tiny", IpAllocation.Purpose.JOB)
    released.refresh_from_db()
    assert released.pool_id == other.pk and released.released_at is not None


def test_the_molt_pool_is_created_from_the_ip_plan_on_first_use(db):
    assert not IpPool.objects.filter(name=ipplan.MOLT_POOL).exists()
    lease = allocate_address(ipplan.MOLT_POOL, IpAllocation.Purpose.NODE)
    pool = IpPool.objects.get(name=ipplan.MOLT_POOL)
    assert pool.cidr == "10.100.128.0/17"
    assert lease.address == "10.100.128.1"
    assert pool.next_offset == 2


def test_the_molt_range_ends_at_its_last_host_never_at_its_broadcast_address(db):
    allocate_address(ipplan.MOLT_POOL, IpAllocation.Purpose.NODE)  # creates the pool
    # Offset 32766 is 10.100.255.254, the last host of 10.100.128.0/17.
    IpPool.objects.filter(name=ipplan.MOLT_POOL).update(next_offset=32765)

    leases = [allocate_address(ipplan.MOLT_POOL, IpAllocation.Purpose.JOB) for _ in range(2)]

    assert [lease.address for lease in leases] == ["10.100.255.253", "10.100.255.254"]
    with pytest.raises(PoolExhausted):
        allocate_address(ipplan.MOLT_POOL, IpAllocation.Purpose.JOB)
    handed_out = set(IpAllocation.objects.values_list("address", flat=True))
    assert handed_out == {"10.100.128.1", "10.100.255.253", "10.100.255.254"}


def test_job_addresses_are_hosts_of_the_jobs_block_up_to_its_end(funded_buyer, node, listing):
    # The node took 10.100.48.1 of its region's block (eu-west); jobs start at 10.64.0.1 of
    # their own block.
    assert node.mesh_address == "10.100.48.1"
    # Offset 2,097,150 is 10.95.255.254, the last host of 10.64.0.0/11 (never its broadcast).
    IpPool.objects.create(name=ipplan.JOB_BLOCK, cidr="10.64.0.0/11", next_offset=2_097_150)
    last, beyond = place(funded_buyer, listing), place(funded_buyer, listing)

    provision_order(last.pk)
    provision_order(beyond.pk)

    assert reload(last).job_peer.address == "10.95.255.254"
    beyond = reload(beyond)
    assert beyond.state == "failed" and beyond.job_peer is None
    # The refusal names the jobs pool: a full job block never reads as the nodes' pool.
    assert "'jobs' is exhausted" in beyond.reason
    assert list(JobPeer.objects.values_list("address", flat=True)) == ["10.95.255.254"]
    # Nodes still enrol: their pools (the node's region's, the MOLT block) are untouched by the
    # jobs' exhaustion.
    assert allocate_address("eu-west", IpAllocation.Purpose.NODE).address == "10.100.48.2"
    assert allocate_address(ipplan.MOLT_POOL, IpAllocation.Purpose.NODE).address == "10.100.128.1"
