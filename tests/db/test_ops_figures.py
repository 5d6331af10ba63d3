"""The operators' dashboard, /ops/: staff only; its figures match the rows; its charts are
drawn from them; and its query count does not grow with the data (the demo market once, then
ten times over)."""

from __future__ import annotations

import re
from datetime import date

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from frontend.ops_views import bar_chart, daily_points
from frontend.templatetags.molt_format import usd
from marketplace.audit import record_audit_run
from marketplace.models import AuditRun, EscrowHold, Order
from marketplace.orders import fail_order
from meshnet.models import Node
from tests.scaled_market import seed_scaled_market

pytestmark = [pytest.mark.db, pytest.mark.django_db]

OPS = "/ops/"


@pytest.fixture
def ops(django_user_model):
    operator = django_user_model.objects.create_user(
        "operator", password="operator-pass-123", is_staff=True
    )
    browser = Client()
    browser.force_login(operator)
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
    assert "changed my mind" in html
    assert "desired state refused: bad signature" in html


def test_the_molt_pool_shows_its_live_leases(ops):
    (market,) = seed_scaled_market(1)

    html = ops.get(OPS).content.decode()

    molt = re.search(r'id="pool-molt".*?<span data-live>(\d+)</span> of (\d+)', html, re.S)
    # One lease per node, plus the running order's job address (the rest are quarantined).
    assert int(molt.group(1)) == len(market.nodes) + 1
    assert int(molt.group(2)) == 32766
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
    # Session and user, then one aggregate per figure: no query per node, order or day.
    assert len(once) <= 18
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
