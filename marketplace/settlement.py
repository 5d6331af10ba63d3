"""Settlement: what an ended order is billed for, and capturing it from the hold exactly once.

The billing arithmetic itself is pure (marketplace.billing); this module reads the order's
span and its node's outages and moves the money. Locks: the order row, then the hold row and
accounts (after the node row where a caller holds it: the lock order of docs/architecture.md).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from marketplace import billing, cluster_ledger, ledger
from marketplace.errors import InvalidTransition
from marketplace.models import Account, EarningsHold, Order, Settlement
from meshnet.models import NodeOutage


def billing_span(order: Order, cut_at: datetime | None = None) -> tuple[datetime, datetime] | None:
    """What an order is billed for: from the agent's ack to the earliest of the stop request,
    the end of booked time and `cut_at` (the last heartbeat of a node that was lost). None when
    it never ran."""
    if order.running_since is None:
        return None
    ends = [t for t in (order.ends_at, order.stop_requested_at, cut_at) if t is not None]
    end = min(ends) if ends else (order.ended_at or timezone.now())
    return order.running_since, max(end, order.running_since)


def charged_seconds(order: Order, cut_at: datetime | None = None) -> tuple[int, int]:
    """(charged, offline) whole seconds of the billing span: the provider node's recorded
    outages (NodeOutage) inside it are not charged (see billing.charged_seconds)."""
    span = billing_span(order, cut_at)
    if span is None:
        return 0, 0
    start, end = span
    outages = NodeOutage.objects.filter(
        node_id=order.listing.node_id, started_at__lt=end, ended_at__gt=start
    ).values_list("started_at", "ended_at")
    return billing.charged_seconds(start, end, list(outages))


def cost_so_far(order: Order, now: datetime | None = None) -> int:
    """What `order` has cost up to `now`, in micro-USD: its capture once settled; before that,
    what settling it now would capture (time charged without the node's outages, plus traffic
    at the per-GiB price, at most the hold). 0 for an order that never ran. Reads only: one
    query for the outages of a live order, none for a settled one."""
    settlement = getattr(order, "settlement", None)
    if settlement is not None:
        return settlement.captured
    if order.running_since is None:
        return 0
    seconds, _ = charged_seconds(order, cut_at=now or timezone.now())
    return billing.settlement_amounts(
        hold=order.hold_amount,
        price_per_gpu_hour=order.price_per_gpu_hour,
        price_per_gib=order.price_per_gib,
        gpu_count=order.gpu_count,
        billed_seconds=seconds,
        total_bytes=order.bytes_in + order.bytes_out,
        fee_bps=0,
    ).captured


def cost_rate_per_hour(order: Order) -> int:
    """What another hour of `order` costs in GPU time, in micro-USD (traffic comes on top, at
    the per-GiB price): its GPUs at their price while it runs, else 0."""
    if order.state != Order.State.RUNNING:
        return 0
    return order.price_per_gpu_hour * order.gpu_count


def settle_order(order: Order, *, cut_at: datetime | None = None) -> Settlement:
    """Capture time + bandwidth (up to the hold), take the fee, release the rest; exactly once
    (unique Settlement.order and hold resolution back this). The provider's share goes into a
    frozen account of this order (an EarningsHold) until the dispute window passes: see
    marketplace.payments. `cut_at` ends the billing span early (a lost node's last heartbeat).

    Locks: the order row, then the hold row and accounts."""
    with transaction.atomic():
        order = (
            Order.objects.select_for_update(of=("self",))
            .select_related("listing", "hold")
            .get(pk=order.pk)
        )
        existing = Settlement.objects.filter(order=order).first()
        if existing is not None:
            return existing
        if order.state not in Order.ENDED_STATES:
            # Settling a live order would bill it so far and release the rest while it runs.
            raise InvalidTransition(f"order {order.pk} is {order.state}: only ended orders settle")
        if order.state == Order.State.CANCELLED:
            # Cancelled before it ran: its hold (a part: its share of the cluster's, which stays
            # open while other parts live) went back whole. A part capture of 0 would still write
            # a transaction and a Settlement for an order that never ran.
            raise InvalidTransition(f"order {order.pk} was cancelled before it ran: no settlement")
        seconds, offline = charged_seconds(order, cut_at)
        part = order.cluster_id is not None
        amounts = billing.settlement_amounts(
            # A part of a multi-node order is billed against its share of the cluster's one
            # hold (marketplace.cluster_ledger); a single-node order against its own hold.
            hold=order.hold_amount if part else order.hold.amount,
            price_per_gpu_hour=order.price_per_gpu_hour,
            price_per_gib=order.price_per_gib,
            gpu_count=order.gpu_count,
            billed_seconds=seconds,
            total_bytes=order.bytes_in + order.bytes_out,
            fee_bps=settings.MOLT_PLATFORM_FEE_BPS,
        )
        frozen = None
        if amounts.captured:
            frozen = Account.objects.create(kind=Account.Kind.FROZEN, user=order.listing.owner)
        if part:
            txn = cluster_ledger.capture_part(
                order, captured=amounts.captured, fee=amounts.fee, earnings=frozen
            )
        else:
            txn = ledger.resolve_hold(
                order.hold,
                captured=amounts.captured,
                fee=amounts.fee,
                provider=order.listing.owner,
                memo=f"settlement of order {order.pk}",
                earnings=frozen,
            )
        if frozen is not None:
            window = timedelta(seconds=settings.MOLT_DISPUTE_WINDOW_SECONDS)
            EarningsHold.objects.create(
                order=order,
                provider=order.listing.owner,
                account=frozen,
                amount=amounts.provider_amount,
                release_after=timezone.now() + window,
            )
        settlement = Settlement.objects.create(
            order=order,
            transaction=txn,
            billed_seconds=seconds,
            offline_seconds=offline,
            time_charge=amounts.time_charge,
            bandwidth_bytes=order.bytes_in + order.bytes_out,
            bandwidth_charge=amounts.bandwidth_charge,
            captured=amounts.captured,
            fee=amounts.fee,
            provider_amount=amounts.provider_amount,
            released=amounts.released,
        )
        if part:
            # After the capture: the last part's end releases what is left of the hold.
            cluster_ledger.part_ended(order)
        return settlement
