"""Node reliability: jobs completed versus failed on the node, times its heartbeat uptime,
shown on listings (0..100) and usable as the `min_reliability` filter."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from marketplace import ledger
from marketplace.listings import create_listing
from marketplace.models import NodeReliability, Order
from marketplace.orders import expire_orders, place_order, provision_order, stop_order
from marketplace.reliability import refresh_reliability
from meshnet.agent_channel import acknowledge_revision
from meshnet.models import Node
from meshnet.nodes import record_heartbeat
from tests import factories
from tests.factories import USD

pytestmark = [pytest.mark.db, pytest.mark.django_db]


def ack(node) -> None:
    node.refresh_from_db()
    acknowledge_revision(node, node.desired_revision)


def place(buyer, listing) -> Order:
    order = place_order(
        buyer,
        listing_id=listing.pk,
        gpu_count=1,
        hours=1,
        wireguard_public_key=factories.wg_public_key(),
    )
    provision_order(order.pk)
    return Order.objects.get(pk=order.pk)


def heartbeats(node, start, end, every=timedelta(seconds=30)) -> None:
    at = start
    while at <= end:
        record_heartbeat(Node.objects.get(pk=node.pk), at=at)
        at += every


@pytest.fixture
def track_record(buyer, listing, node, settings):
    """Three jobs completed and one failed on the node; a cancellation that does not count."""
    ledger.grant_credits(buyer, 100 * USD)
    for _ in range(3):
        order = place(buyer, listing)
        ack(node)
        stop_order(Order.objects.get(pk=order.pk))
        ack(node)
        assert Order.objects.get(pk=order.pk).state == "completed"
    failed = place(buyer, listing)  # the node never acknowledges it
    timeout = timedelta(seconds=settings.MOLT_PROVISIONING_TIMEOUT_SECONDS + 1)
    expire_orders(now=timezone.now() + timeout)
    assert Order.objects.get(pk=failed.pk).state == "failed"
    cancelled = place_order(
        buyer,
        listing_id=listing.pk,
        gpu_count=1,
        hours=1,
        wireguard_public_key=factories.wg_public_key(),
    )
    stop_order(cancelled)


def test_score_is_job_success_times_uptime(node, track_record, settings):
    settings.MOLT_RELIABILITY_WINDOW_SECONDS = 3600
    enrolled = Node.objects.get(pk=node.pk).enrolled_at
    now = enrolled + timedelta(hours=2)
    # Up all the time but for six minutes of the last hour: 90 % uptime.
    heartbeats(node, enrolled, now - timedelta(minutes=30))
    heartbeats(node, now - timedelta(minutes=24), now)

    assert refresh_reliability(now=now) == 1

    record = NodeReliability.objects.get(node=node)
    assert (record.jobs_completed, record.jobs_failed) == (3, 1)
    assert record.uptime_bp == 9000
    assert record.score == 68  # round(100 x 3/4 x 0.9) = round(67.5)


def test_a_node_silent_now_loses_uptime_from_its_last_heartbeat(node, settings):
    settings.MOLT_RELIABILITY_WINDOW_SECONDS = 3600
    enrolled = Node.objects.get(pk=node.pk).enrolled_at
    now = enrolled + timedelta(hours=1)
    heartbeats(node, enrolled, now - timedelta(minutes=15))
    refresh_reliability(now=now)
    record = NodeReliability.objects.get(node=node)
    assert record.uptime_bp == 7500
    assert record.score == 75  # no finished jobs yet: success counts as 1


def test_a_node_never_heard_from_scores_zero(node):
    refresh_reliability()
    assert NodeReliability.objects.get(node=node).score == 0


def test_refreshing_again_overwrites_the_score(node, settings):
    enrolled = Node.objects.get(pk=node.pk).enrolled_at
    refresh_reliability(now=enrolled + timedelta(minutes=1))
    heartbeats(node, enrolled, enrolled + timedelta(minutes=10))
    refresh_reliability(now=enrolled + timedelta(minutes=10))
    assert NodeReliability.objects.filter(node=node).count() == 1
    assert NodeReliability.objects.get(node=node).score == 100


@pytest.mark.usefixtures("nodes_online")
def test_listings_show_the_score_and_filter_on_it(
    api_client_for, buyer, provider, listing, node, settings
):
    settings.MOLT_RELIABILITY_WINDOW_SECONDS = 3600
    enrolled = Node.objects.get(pk=node.pk).enrolled_at
    heartbeats(node, enrolled, enrolled + timedelta(hours=1))
    refresh_reliability(now=enrolled + timedelta(hours=1))
    unscored_node = factories.enrolled_node(provider, gpus=[factories.gpu(0, name="A100")])
    unscored = create_listing(
        provider, node=unscored_node, gpu_count=1, price_per_gpu_hour=USD, price_per_gib=0
    )
    client = api_client_for(buyer)

    shown = {
        item["id"]: item["reliability"]
        for item in client.get("/api/v1/listings/").json()["results"]
    }
    assert shown == {listing.pk: 100, unscored.pk: None}
    assert client.get(f"/api/v1/listings/{listing.pk}/").json()["reliability"] == 100

    def ids(query: str) -> set[int]:
        return {item["id"] for item in client.get(f"/api/v1/listings/?{query}").json()["results"]}

    assert ids("min_reliability=100") == {listing.pk}
    assert ids("min_reliability=0") == {listing.pk}  # no score yet: left out
    NodeReliability.objects.filter(node=node).update(score=40)
    assert ids("min_reliability=41") == set()
    bad = client.get("/api/v1/listings/?min_reliability=high")
    assert bad.status_code == 400 and "min_reliability" in bad.json()


def test_a_refresh_is_a_bounded_number_of_statements_whatever_the_number_of_nodes(
    provider, django_assert_max_num_queries
):
    """A bulk upsert (issue 14: an update_or_create per node took 9 s at 5,450 nodes)."""
    nodes = [factories.enrolled_node(provider, gpus=[factories.gpu(0)]) for _ in range(12)]
    now = timezone.now()
    for node in nodes:
        record_heartbeat(Node.objects.get(pk=node.pk), at=now)
    NodeReliability.objects.create(
        node=nodes[0], score=7, jobs_completed=0, jobs_failed=3, uptime_bp=700
    )
    with django_assert_max_num_queries(6):
        assert refresh_reliability(now=now) == 12
    rows = NodeReliability.objects.filter(node__in=nodes)
    assert rows.count() == 12
    assert {(r.score, r.jobs_failed, r.uptime_bp, r.updated_at) for r in rows} == {
        (100, 0, 10_000, now)
    }
