"""Orders and money paths that tests/db/test_payments.py and test_payments_guards.py share:
an order placed, one run and settled through the real paths, and the accounts'
balances (the provider with a share released to earnings is tests/db/conftest.py's
earning_provider)."""

from __future__ import annotations

from datetime import timedelta

from django.utils import timezone

from marketplace.models import Account, Order
from marketplace.orders import place_order, provision_order, stop_order
from meshnet.agent_channel import acknowledge_revision
from tests import factories


def ack(node, at=None) -> None:
    node.refresh_from_db()
    acknowledge_revision(node, node.desired_revision, at=at)


def placed_order(buyer, listing, *, hours: int = 1) -> Order:
    """A one-GPU order of `listing`, placed by `buyer` (pending: not provisioned)."""
    return place_order(
        buyer,
        listing_id=listing.pk,
        gpu_count=1,
        hours=hours,
        wireguard_public_key=factories.wg_public_key(),
    )


def settled_order(buyer, listing, node, *, minutes: int = 90) -> Order:
    """An order that ran `minutes` and was stopped, removed and settled, through real paths."""
    order = placed_order(buyer, listing, hours=3)
    provision_order(order.pk)
    ack(node, at=timezone.now() - timedelta(minutes=minutes))
    stop_order(Order.objects.get(pk=order.pk))
    ack(node)
    order = Order.objects.select_related("settlement", "earnings_hold").get(pk=order.pk)
    assert order.state == "completed"
    return order


def balances() -> dict[int, int]:
    return dict(Account.objects.values_list("pk", "balance"))
