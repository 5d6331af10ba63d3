"""The operators' dashboard, /ops/: staff only; its figures match the rows; its charts are
drawn from them; and its query count does not grow with the data (the demo market once, then
ten times over)."""

from __future__ import annotations

import re
from datetime import date, timedelta

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from frontend.ops_views import bar_chart, daily_points
from frontend.templatetags.molt_format import usd
from marketplace import ledger, payments
from marketplace.audit import record_audit_run
from marketplace.models import AuditRun, Dispute, EscrowHold, Order, PayoutRequest
from marketplace.orders import fail_order, place_order
from meshnet import ipplan
from meshnet.models import Node
from tests.factories import staff_login, wg_public_key
from tests.scaled_market import seed_scaled_market

pytestmark = [pytest.mark.db, pytest.mark.django_db]

OPS = "/ops/"


@pytest.fixture
def ops(django_user_model):
    operator = django_user_model.objects.create_user(
        "operator", password="operator-pass-123", is_staff=True
    )
    browser = Client()
    staff_login(browser, operator)
    return browser


def figure(html: str, element_id: str) -> str:
    return re.search(rf'id="{element_id}">([^<]*)<', html).group(1).strip()


def bars(html: str, chart_id: str) -> list[int]:
    chart = re.search(rf'<figure class="chart-figure" id="{chart_id}">(.*?)</figure>', html, re.S)
    return [
        int(value)
        for value in re.findall(r'<rect class="bar[^"]*"[^>]*data-value="(-?\d+)"', chart.group(1))
    ]


# --- access ---------------------------------------------------------------------------------------


def test_the_dashboard_is_for_staff_only(client, buyer):
    assert client.get(OPS).status_code == 302
    client.force_login(buyer)
    response = client.get(OPS)
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_an_empty_gateway_has_a_dashboard_with_empty_states(ops):
    html = ops.get(OPS).content.decode()

    assert figure(html, "nodes-online") == "0"
    assert figure(html, "escrow-held") == "$0.00"
    assert figure(html, "audit-result") == "OK"
    assert 'id="no-failures"' in html
    assert html.count("data-chart-empty") == 3  # revenue, bandwidth, jobs: nothing yet
    assert "ran it just now" in html  # no stored audit yet


# --- figures and charts ---------------------------------------------------------------------------


def test_the_figures_and_charts_come_from_the_rows(ops):
    (market,) = seed_scaled_market(1)

    html = ops.get(OPS).content.decode()

    online = Node.objects.online().count()
    assert 0 < online < len(market.nodes)
    assert figure(html, "nodes-online") == str(online)
    assert figure(html, "jobs-live") == "2"  # the running and the pending order
    held = sum(h.amount for h in EscrowHold.objects.filter(state="open"))
    assert held > 0
    assert figure(html, "escrow-held") == usd(held)
    assert figure(html, "audit-result") == "OK"
    # Jobs by state: one bar per state, heights in the order of Order.State.
    assert bars(html, "jobs-chart") == [
        Order.objects.filter(state=state).count() for state in Order.State.values
    ]
    # Today's revenue bar is the fees of the two settlements; bandwidth, their bytes.
    completed = Order.objects.filter(state="completed")
    fees = sum(order.settlement.fee for order in completed)
    assert fees > 0 and bars(html, "revenue-chart")[-1] == fees
    assert figure(html, "revenue") == usd(fees)
    moved = sum(o.bytes_in + o.bytes_out for o in Order.objects.exclude(ended_at=None))
    assert moved > 0 and bars(html, "bandwidth-chart")[-1] == moved
    # Recent failures with their reasons, and the node's complaint.
    assert "the provider node did not acknowledge in time" in html
    assert "changed my mind" not in html  # a buyer's cancellation is no failure
    assert "desired state refused: bad signature" in html


def test_the_node_and_jobs_pools_show_their_live_leases(ops):
    (market,) = seed_scaled_market(1)

    html = ops.get(OPS).content.decode()

    # One lease per node, in the block of the region it declared (the molt block without one):
    # job addresses have their own block.
    live = 0
    for name, size in [("molt", 32766), *((region, 4094) for region in ipplan.REGIONS)]:
        pool = re.search(rf'id="pool-{name}".*?<span data-live>(\d+)</span> of (\d+)', html, re.S)
        live += int(pool.group(1))
        assert int(pool.group(2)) == size
    assert live == len(market.nodes)
    jobs = re.search(r'id="pool-jobs".*?<span data-live>(\d+)</span> of (\d+)', html, re.S)
    # The running order's job address (the ended ones' are quarantined).
    assert int(jobs.group(1)) == 1
    assert int(jobs.group(2)) == 2097150
    assert 'id="pool-workload"' in html


def test_the_stored_audit_result_is_shown(ops):
    seed_scaled_market(1)
    run = record_audit_run(source="beat")

    html = ops.get(OPS).content.decode()

    assert figure(html, "audit-result") == "OK"
    assert "by the beat" in html and f"{run.transaction_count} transactions" in html


def test_a_failed_audit_is_shown_as_violations(ops):
    AuditRun.objects.create(
        ok=False,
        violation_count=2,
        violations="account #3 (wallet) is below zero: -5\norder 9 has no escrow hold",
        transaction_count=10,
        entry_count=20,
    )

    html = ops.get(OPS).content.decode()

    assert figure(html, "audit-result") == "2 violations"
    assert "order 9 has no escrow hold" in html


def test_a_failure_reason_is_listed_newest_first(ops):
    (market,) = seed_scaled_market(1)
    pending = market.orders["pending"][0]
    fail_order(pending, "operator test: the newest failure")

    html = ops.get(OPS).content.decode()

    rows = re.findall(r"<tr><td><a [^>]*>#(\d+)</a>", html)
    assert rows[0] == str(pending.pk)


# --- cost -------------------------------------------------------------------------------------


def test_the_dashboard_costs_the_same_queries_at_ten_times_the_demo_market(ops):
    seed_scaled_market(1)
    record_audit_run(source="beat")  # as on a running gateway: the page shows the stored run
    ops.get(OPS)  # warm: the session, content types
    with CaptureQueriesContext(connection) as once:
        assert ops.get(OPS).status_code == 200

    seed_scaled_market(9, start=1)
    assert Order.objects.count() == 10 * 6
    with CaptureQueriesContext(connection) as ten_times:
        html = ops.get(OPS).content.decode()

    assert len(ten_times) == len(once), [q["sql"][:120] for q in ten_times.captured_queries]
    # Session and user, then one aggregate per figure (and the two queues' rows and sizes): no
    # query per node, order or day.
    assert len(once) <= 22
    assert figure(html, "jobs-live") == "20"


# --- the chart geometry (pure) ------------------------------------------------------------------


def test_bars_scale_to_the_peak_and_a_small_value_stays_visible():
    chart = bar_chart([("a", 0), ("b", 50), ("c", 100), ("d", 1)], str, width=400, height=100)

    heights = [bar.height for bar in chart.bars]
    assert heights[0] == 0 and heights[2] == max(heights)
    assert heights[1] == pytest.approx(heights[2] / 2, abs=0.01)
    assert 0 < heights[3] < heights[1]  # 1 % of the peak, still drawn
    assert all(bar.y + bar.height == pytest.approx(chart.baseline) for bar in chart.bars)
    assert [bar.x for bar in chart.bars] == sorted(bar.x for bar in chart.bars)
    assert chart.bars[-1].x + chart.bars[-1].width <= 400
    assert (chart.peak_text, chart.total_text, chart.empty) == ("100", "151", False)


def test_an_all_zero_series_is_an_empty_chart():
    chart = bar_chart([("a", 0), ("b", 0)], str)

    assert chart.empty and all(bar.height == 0 for bar in chart.bars)


def test_daily_points_fill_missing_days_with_zero():
    points = daily_points({date(2026, 3, 2): 5}, date(2026, 3, 3), 3)

    assert points == [("2026-03-01", 0), ("2026-03-02", 5), ("2026-03-03", 0)]


# --- what waits for an operator ---------------------------------------------------------------


def test_the_dispute_and_payout_queues_show_oldest_first_with_their_ages(ops):
    seed_scaled_market(2)
    completed = list(Order.objects.filter(state="completed").order_by("pk"))
    assert len(completed) == 4
    now = timezone.now()
    disputed = completed[:2]
    for age, order in zip((timedelta(hours=2), timedelta(days=1, hours=6)), disputed, strict=True):
        dispute = payments.open_dispute(order, order.buyer, f"dispute of #{order.pk}")
        Dispute.objects.filter(pk=dispute.pk).update(opened_at=now - age)
    provider = completed[2].listing.owner
    # An undisputed order's share, released to earnings, is what its provider asks to be paid.
    payments.release_due_earnings(now=now + timedelta(days=30))
    earned = ledger.earnings_for(provider)
    assert earned > 0
    payout = payments.request_payout(provider, earned)
    PayoutRequest.objects.filter(pk=payout.pk).update(requested_at=now - timedelta(days=3, hours=1))

    html = ops.get(OPS).content.decode()

    queue = re.search(r'id="dispute-queue".*?</section>', html, re.S).group(0)
    assert figure(queue, "disputes-count") == "2"
    ids = [int(i) for i in re.findall(r'data-dispute-id="(\d+)"', queue)]
    assert ids == list(
        Dispute.objects.order_by("opened_at").values_list("pk", flat=True)
    )  # oldest first
    ages = re.findall(r'<td class="age"><time [^>]*>([^<]+)</time>', queue)
    assert ages == ["1\xa0day, 6\xa0hours", "2\xa0hours"]
    payouts = re.search(r'id="payout-queue".*?</section>', html, re.S).group(0)
    assert figure(payouts, "payouts-count") == "1"
    assert f'data-payout-id="{payout.pk}"' in payouts
    assert "3\xa0days, 1\xa0hour" in payouts
    assert usd(earned) in payouts


def test_empty_queues_say_so(ops):
    html = ops.get(OPS).content.decode()
    assert 'id="no-disputes"' in html and 'id="no-payouts"' in html


def test_one_order_in_all_is_singular(ops, funded_buyer, listing):
    place_order(
        funded_buyer,
        listing_id=listing.pk,
        gpu_count=1,
        hours=1,
        wireguard_public_key=wg_public_key(),
    )
    html = ops.get(OPS).content.decode()
    assert "1 order in all" in html and "1 orders" not in html
