"""The browser pages' realtime (frontend.realtime): the domain signals of meshnet and
marketplace become group sends to the pages' groups, after commit and only after commit.

An in-memory channel layer in this process stands in for Redis: what is tested is what is sent,
to which group, and when (the websockets that relay it are tested in test_buyer_pages and
test_provider_pages)."""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer
from django.db import transaction

from frontend.realtime import order_group, owner_group
from marketplace import ledger
from marketplace.orders import place_order, provision_order, stop_order
from meshnet.models import Node
from meshnet.nodes import record_heartbeat, revoke_node
from tests.factories import wg_public_key

pytestmark = [pytest.mark.db, pytest.mark.django_db]


class Rollback(Exception):
    """Raised inside a transaction to roll it back."""


@pytest.fixture
def layer(settings):
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    return get_channel_layer()


@pytest.fixture
def pending_order(buyer, listing):
    ledger.grant_credits(buyer, 100_000_000)
    return place_order(
        buyer, listing_id=listing.pk, gpu_count=1, hours=1, wireguard_public_key=wg_public_key()
    )


def events_in(layer, group: str, action, capture) -> list[dict]:
    """What `group` receives while `action` runs with its on-commit callbacks executed (as they
    would be when the test's outer transaction commits)."""

    def act() -> None:
        with capture(execute=True):
            action()

    async def listen() -> list[dict]:
        channel = await layer.new_channel()
        await layer.group_add(group, channel)
        await sync_to_async(act)()
        events = []
        while True:
            try:
                events.append(await asyncio.wait_for(layer.receive(channel), 0.3))
            except TimeoutError:
                return events

    return async_to_sync(listen)()


def rolled_back(action):
    def run() -> None:
        try:
            with transaction.atomic():
                action()
                raise Rollback
        except Rollback:
            pass

    return run


def test_an_order_transition_tells_the_orders_pages_after_commit(
    layer, pending_order, django_capture_on_commit_callbacks
):
    events = events_in(
        layer,
        order_group(pending_order.pk),
        lambda: provision_order(pending_order.pk),
        django_capture_on_commit_callbacks,
    )
    assert events == [{"type": "order.changed", "order": pending_order.pk}]


def test_an_order_transition_that_rolls_back_tells_nobody(
    layer, pending_order, django_capture_on_commit_callbacks
):
    events = events_in(
        layer,
        order_group(pending_order.pk),
        rolled_back(lambda: stop_order(pending_order)),
        django_capture_on_commit_callbacks,
    )
    assert events == []
    pending_order.refresh_from_db()
    assert pending_order.state == "pending"


def test_a_node_change_tells_its_owners_pages_after_commit(
    layer, provider, node, django_capture_on_commit_callbacks
):
    events = events_in(
        layer,
        owner_group(provider.pk),
        lambda: revoke_node(Node.objects.get(pk=node.pk)),
        django_capture_on_commit_callbacks,
    )
    assert events == [{"type": "node.changed", "node": node.pk, "change": "revoked"}]


def test_a_node_change_that_rolls_back_tells_nobody(
    layer, provider, node, django_capture_on_commit_callbacks
):
    events = events_in(
        layer,
        owner_group(provider.pk),
        rolled_back(lambda: record_heartbeat(Node.objects.get(pk=node.pk), "203.0.113.9")),
        django_capture_on_commit_callbacks,
    )
    assert events == []
    assert Node.objects.get(pk=node.pk).last_seen_at is None


def test_the_pages_groups_are_named_as_the_browser_sockets_join_them():
    assert (order_group(7), owner_group(3)) == ("order.7", "owner.3")
