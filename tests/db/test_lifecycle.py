"""The order's one state machine (marketplace.lifecycle): the table of allowed transitions, the
compare-and-set that refuses anything else, and a lost race that changes nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from django.utils import timezone

from marketplace import ledger, lifecycle
from marketplace.errors import InvalidTransition
from marketplace.listings import create_listing
from marketplace.models import Order, OrderTransition
from marketplace.orders import (
    complete_order,
    mark_running,
    place_order,
    provision_order,
    stop_order,
)
from tests import factories

pytestmark = [pytest.mark.db, pytest.mark.django_db]

REPO = Path(__file__).resolve().parents[2]
S = Order.State


@pytest.fixture
def listing(provider):
    node = factories.enrolled_node(provider, gpus=[factories.gpu(0)])
    return create_listing(
        provider, node=node, gpu_count=1, price_per_gpu_hour=1_000_000, price_per_gib=10_000
    )


@pytest.fixture
def order(buyer, listing) -> Order:
    ledger.grant_credits(buyer, 100 * 1_000_000)
    return place_order(
        buyer,
        listing_id=listing.pk,
        gpu_count=1,
        hours=1,
        wireguard_public_key=factories.wg_public_key(),
    )


def log_of(order: Order) -> list[tuple[str, str]]:
    return list(OrderTransition.objects.filter(order=order).values_list("from_state", "to_state"))


def test_the_table_is_the_lifecycle_of_design_money_md():
    assert set(lifecycle.ALLOWED) == {"", *S.values}
    allowed = {(a, b) for a, tos in lifecycle.ALLOWED.items() for b in tos}
    assert allowed == {
        ("", "pending"),
        ("pending", "provisioning"),
        ("pending", "cancelled"),
        ("pending", "failed"),
        ("provisioning", "running"),
        ("provisioning", "cancelled"),
        ("provisioning", "failed"),
        ("running", "stopping"),
        ("running", "failed"),
        ("stopping", "completed"),
        ("stopping", "failed"),
        ("completed", "disputed"),
        ("failed", "disputed"),
        ("disputed", "resolved"),
    }
    # Ended states only move on to a dispute: nothing ever goes back to a live state.
    for ended in Order.ENDED_STATES:
        assert not lifecycle.ALLOWED[ended] & set(Order.LIVE_STATES)


def test_a_transition_outside_the_table_is_refused_and_writes_nothing(order):
    provision_order(order.pk)
    mark_running(Order.objects.get(pk=order.pk), timezone.now())
    stop_order(Order.objects.get(pk=order.pk))
    assert complete_order(Order.objects.get(pk=order.pk), timezone.now())
    completed = Order.objects.get(pk=order.pk)
    assert completed.state == S.COMPLETED
    before = log_of(completed)

    with pytest.raises(InvalidTransition, match="from completed to running"):
        lifecycle.transition(
            completed, S.COMPLETED, S.RUNNING, "back to life", running_since=timezone.now()
        )

    after = Order.objects.get(pk=order.pk)
    assert after.state == S.COMPLETED
    assert after.running_since == completed.running_since
    assert log_of(after) == before


def test_a_lost_race_changes_nothing(order):
    # Two workers read the order while it was pending; the first one moves it.
    first, second = Order.objects.get(pk=order.pk), Order.objects.get(pk=order.pk)
    assert lifecycle.transition(first, S.PENDING, S.PROVISIONING, "job address allocated")

    ended_at = timezone.now()
    lost = lifecycle.transition(
        second, S.PENDING, S.CANCELLED, "stopped by the buyer", ended_at=ended_at, reason="late"
    )

    assert lost is False
    after = Order.objects.get(pk=order.pk)
    assert (after.state, after.ended_at, after.reason) == (S.PROVISIONING, None, "")
    assert log_of(after) == [("", "pending"), ("pending", "provisioning")]


def test_no_module_but_lifecycle_writes_an_order_state_or_its_log():
    writers = []
    for path in (REPO / "marketplace").rglob("*.py"):
        if "migrations" in path.parts or path.name == "lifecycle.py":
            continue
        text = path.read_text()
        if re.search(
            r"OrderTransition\.objects\.create|\bOrder\.objects[^\n]*update\(state=", text
        ):
            writers.append(path.name)
    assert writers == []
