"""What a job costs as it runs (issue 12 item 4): spent so far and the rate now, in the API
(integers of the ledger's unit) and on the order page (in dollars); an allowance bar that shows
small use; a usage chart with labelled axes and units."""

from __future__ import annotations

import re
import time
from datetime import timedelta

import pytest
from clawnode import wire
from clawnode.keys import Identity
from django.utils import timezone

from frontend.buyer_views import allowance_percent
from marketplace import ledger
from marketplace.listings import create_listing
from marketplace.models import Order
from marketplace.money import format_usd
from marketplace.orders import place_order, provision_order, stop_order
from meshnet.agent_channel import acknowledge_revision, ingest_metering
from meshnet.enrolment import create_enrollment_token, enroll_node
from meshnet.models import NodeOutage
from meshnet.units import format_bytes
from tests import factories
from tests.factories import USD

pytestmark = [pytest.mark.db, pytest.mark.django_db]

MIB = 1 << 20
GIB = 1 << 30


def ack(node, at=None) -> None:
    node.refresh_from_db()
    acknowledge_revision(node, node.desired_revision, at=at)


@pytest.fixture
def order(funded_buyer, provider, node):
    """Two GPUs at $3.60 per GPU-hour ($0.001 per GPU-second), $0.010 per GiB, running for an
    hour (the ack is dated an hour back)."""
    listing = create_listing(
        provider, node=node, gpu_count=2, price_per_gpu_hour=3_600_000, price_per_gib=10_000
    )
    placed = place_order(
        funded_buyer,
        listing_id=listing.pk,
        gpu_count=2,
        hours=3,
        wireguard_public_key=factories.wg_public_key(),
    )
    provision_order(placed.pk)
    ack(node, at=timezone.now() - timedelta(hours=1))
    placed = Order.objects.get(pk=placed.pk)
    assert placed.state == "running"
    return placed


def test_the_api_says_what_a_running_order_has_cost_and_costs_per_hour(api_client_for, order):
    Order.objects.filter(pk=order.pk).update(bytes_in=2 * GIB, bytes_out=GIB)

    body = api_client_for(order.buyer).get(f"/api/v1/orders/{order.pk}/").json()

    # An hour (and the seconds the test took) of 2 GPUs at $3.60, plus 3 GiB at $0.010.
    time_part = body["cost_so_far"] - 30_000
    assert 7_200_000 <= time_part < 7_200_000 + 2 * 1000 * 60
    assert body["cost_rate_per_hour"] == 7_200_000
    assert body["charges"] is None


def test_outage_time_is_not_in_the_cost_so_far(api_client_for, order):
    now = timezone.now()
    NodeOutage.objects.create(
        node=order.listing.node,
        started_at=now - timedelta(minutes=40),
        ended_at=now - timedelta(minutes=10),
    )

    body = api_client_for(order.buyer).get(f"/api/v1/orders/{order.pk}/").json()

    assert 3_600_000 <= body["cost_so_far"] < 3_600_000 + 2 * 1000 * 60  # half of the hour


def test_the_cost_so_far_never_passes_the_hold(api_client_for, order):
    Order.objects.filter(pk=order.pk).update(bytes_in=10**15)

    body = api_client_for(order.buyer).get(f"/api/v1/orders/{order.pk}/").json()

    assert body["cost_so_far"] == order.hold_amount


def test_once_settled_the_cost_is_what_was_captured_and_the_rate_is_nothing(api_client_for, order):
    stop_order(order)
    ack(order.listing.node)
    order = Order.objects.select_related("settlement").get(pk=order.pk)
    assert order.state == "completed"

    body = api_client_for(order.buyer).get(f"/api/v1/orders/{order.pk}/").json()

    assert body["cost_so_far"] == order.settlement.captured == body["charges"]
    assert body["cost_rate_per_hour"] == 0


def test_an_order_that_never_ran_cost_nothing(api_client_for, funded_buyer, listing):
    placed = place_order(
        funded_buyer,
        listing_id=listing.pk,
        gpu_count=1,
        hours=1,
        wireguard_public_key=factories.wg_public_key(),
    )
    body = api_client_for(funded_buyer).get(f"/api/v1/orders/{placed.pk}/").json()
    assert (body["cost_so_far"], body["cost_rate_per_hour"]) == (0, 0)


def test_the_order_page_shows_spent_so_far_and_the_rate_in_dollars(client, order):
    client.force_login(order.buyer)

    panels = client.get(f"/orders/{order.pk}/panels/").content.decode()

    spent = re.search(r'id="cost-so-far">([^<]+)<', panels).group(1)
    assert spent in {format_usd(7_200_000 + n * 2_000) for n in range(0, 60)}
    rate = re.search(r'id="cost-rate">(.*?)</dd>', panels, re.S).group(1)
    assert rate.startswith("$7.20 per hour (2 GPUs \u00d7 $3.60) + $0.010 per GiB")
    assert f"of {format_usd(order.hold_amount)} held" in panels


def test_the_page_of_an_order_not_running_says_it_costs_nothing_more(client, order):
    stop_order(order)
    client.force_login(order.buyer)
    panels = client.get(f"/orders/{order.pk}/panels/").content.decode()
    assert "nothing: the order is not running" in panels


@pytest.mark.parametrize(
    ("used", "allowance", "shown"),
    [
        (0, 50 * GIB, "0"),
        (103 * MIB, 50 * GIB, "0.20"),  # the "0% of 50 GiB" after 103 MiB
        (1, 50 * GIB, "0.01"),  # anything at all moves off zero
        (GIB, 50 * GIB, "2.0"),
        (25 * GIB, 50 * GIB, "50"),
        (60 * GIB, 50 * GIB, "100"),
    ],
)
def test_the_allowance_share_shows_small_use(used, allowance, shown):
    assert allowance_percent(used, allowance) == shown


def test_the_allowance_bar_moves_with_each_byte(client, order):
    Order.objects.filter(pk=order.pk).update(bytes_in=100 * MIB, bytes_out=3 * MIB)
    client.force_login(order.buyer)

    panels = client.get(f"/orders/{order.pk}/panels/").content.decode()

    allowance = order.bandwidth_allowance_bytes
    meter = re.search(r"<meter id=\"allowance-meter\"[^>]*>", panels).group(0)
    assert f'max="{allowance}"' in meter and f'value="{103 * MIB}"' in meter
    share = allowance_percent(103 * MIB, allowance)
    assert share != "0"
    assert f"103 MiB of {format_bytes(allowance)} ({share}%)" in panels


def metering(identity, key, seq, at, rx, tx):
    body = wire.MeteringSample(
        node_id=identity.node_id,
        boot_id="b" * 22,
        seq=seq,
        sampled_at=at,
        peers=(wire.PeerCounters(public_key=key, epoch=1, rx_bytes=rx, tx_bytes=tx),),
    ).to_dict()
    return wire.signed_envelope(wire.METERING, body, identity)


def test_the_usage_chart_labels_both_axes_with_units(client, buyer, provider):
    identity = Identity.generate()
    issued = create_enrollment_token(provider)
    node = enroll_node(
        factories.enroll_request(identity, issued.token, gpus=[factories.gpu(0)]),
        observed_ip="203.0.113.9",
    ).node
    listing = create_listing(
        provider, node=node, gpu_count=1, price_per_gpu_hour=USD, price_per_gib=10_000
    )
    ledger.grant_credits(buyer, 100 * USD)
    placed = place_order(
        buyer,
        listing_id=listing.pk,
        gpu_count=1,
        hours=1,
        wireguard_public_key=factories.wg_public_key(),
    )
    provision_order(placed.pk)
    ack(node)
    start = int(time.time())
    for seq, (rx, tx) in enumerate([(0, 0), (1000, 4000), (3000, 10_000), (3500, 30_000)]):
        ingest_metering(
            node, metering(identity, placed.wireguard_public_key, seq + 1, start + 10 * seq, rx, tx)
        )
    client.force_login(buyer)

    panels = client.get(f"/orders/{placed.pk}/panels/").content.decode()

    # The top grid line is 2000 B/s (the peak, rounded up to 1-2-5): labelled, and its half.
    y = re.search(r'id="chart-y-labels">(.*?)</div>', panels, re.S).group(1)
    assert re.findall(r"<span>([^<]+)</span>", y) == ["2 KiB/s", "1000 B/s", "0 B/s"]
    x = re.search(r'id="chart-x-labels">(.*?)</div>', panels, re.S).group(1)
    assert len(re.findall(r"<time ", x)) == 3  # start, middle, end
    assert 'class="axis-title y">rate<' in panels and "time (UTC)" in panels
