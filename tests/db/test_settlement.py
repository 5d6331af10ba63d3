"""Settlement's own rules, each pinned by a direct test: the mutation run
(`make mutate MODULES=settlement`) found them reached only through the order's whole life in
tests/db/test_order_lifecycle.py and tests/db/test_offline_billing.py, which never looked."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from marketplace import settlement
from marketplace.errors import InvalidTransition
from marketplace.models import EarningsHold, Order, Settlement
from marketplace.orders import place_order, provision_order, stop_order
from meshnet.agent_channel import acknowledge_revision
from meshnet.models import NodeOutage
from tests import factories

pytestmark = [pytest.mark.db, pytest.mark.django_db]


def place(buyer, listing) -> Order:
    return place_order(
        buyer,
        listing_id=listing.pk,
        gpu_count=1,
        hours=2,
        wireguard_public_key=factories.wg_public_key(),
    )


def test_an_order_that_never_ran_is_charged_no_second(funded_buyer, listing):
    order = place(funded_buyer, listing)
    assert settlement.billing_span(order) is None
    assert settlement.charged_seconds(order) == (0, 0)


def run(order: Order, node, started) -> Order:
    provision_order(order.pk)
    node.refresh_from_db()
    acknowledge_revision(node, node.desired_revision, at=started)
    return Order.objects.select_related("listing", "hold").get(pk=order.pk)


def test_only_the_orders_own_nodes_outages_are_left_unbilled(funded_buyer, provider, node, listing):
    started = timezone.now() - timedelta(hours=1)
    order = run(place(funded_buyer, listing), node, started)
    other = factories.enrolled_node(provider)
    NodeOutage.objects.create(
        node=other,
        started_at=started + timedelta(minutes=5),
        ended_at=started + timedelta(minutes=25),
    )
    cut = started + timedelta(minutes=30)
    assert settlement.charged_seconds(order, cut) == (30 * 60, 0)
    NodeOutage.objects.create(
        node=node,
        started_at=started + timedelta(minutes=10),
        ended_at=started + timedelta(minutes=20),
    )
    assert settlement.charged_seconds(order, cut) == (20 * 60, 10 * 60)


def test_settling_a_live_order_is_refused_naming_the_order_and_its_state(
    funded_buyer, node, listing
):
    order = run(place(funded_buyer, listing), node, timezone.now() - timedelta(minutes=10))
    with pytest.raises(InvalidTransition) as refused:
        settlement.settle_order(order)
    assert str(refused.value) == f"order {order.pk} is running: only ended orders settle"
    assert not Settlement.objects.filter(order=order).exists()


def test_the_providers_share_stays_frozen_for_the_dispute_window_from_settlement(
    funded_buyer, provider, node, listing, settings
):
    order = run(place(funded_buyer, listing), node, timezone.now() - timedelta(minutes=30))
    stop_order(order)
    before = timezone.now()
    node.refresh_from_db()
    acknowledge_revision(node, node.desired_revision)  # the peer is gone: completed, settled
    after = timezone.now()
    settled = Settlement.objects.get(order=order)
    share = EarningsHold.objects.get(order=order)
    window = timedelta(seconds=settings.MOLT_DISPUTE_WINDOW_SECONDS)
    assert before + window <= share.release_after <= after + window
    assert (share.provider_id, share.amount) == (provider.pk, settled.provider_amount)
