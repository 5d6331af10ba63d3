"""An operator opens the ops dashboard in Debian's Chromium against a live server holding the
demo market with orders in every state: it logs in through the admin's login page, and the
dashboard's charts are drawn with data (bars of non-zero height in each inline SVG), its
figures are there, and nothing is loaded from elsewhere. Screenshots go to
test-artifacts/browser/."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from django_otp.plugins.otp_totp.models import TOTPDevice

from marketplace import ledger, payments
from marketplace.audit import record_audit_run
from marketplace.models import Order
from tests.browser.conftest import ARTIFACTS, staff_log_in
from tests.scaled_market import seed_scaled_market

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True), pytest.mark.postgres]

PASSWORD = "run-the-market-2"


def drawn_bars(page, chart_id: str) -> list[float]:
    """Heights of the bars the browser laid out in the chart (its rendered boxes, in px)."""
    bars = page.locator(f"#{chart_id} svg rect.bar")
    return [box["height"] for box in (bars.nth(i).bounding_box() for i in range(bars.count()))]


def test_an_operator_sees_the_dashboard_charts_drawn_with_data(
    live_server, browser_page, django_user_model
):
    page = browser_page
    operator = django_user_model.objects.create_user("operator", password=PASSWORD, is_staff=True)
    # Staff give a TOTP code too (frontend/staff_otp.py): their authenticator app's device.
    TOTPDevice.objects.create(user=operator, name="phone", confirmed=True)
    seed_scaled_market(2)
    # A provider waiting for a payout, so the payout queue has a row (its orders' shares are
    # released to earnings as after the dispute window).
    payments.release_due_earnings(now=timezone.now() + timedelta(days=30))
    provider = Order.objects.filter(state="completed").first().listing.owner
    payout = payments.request_payout(provider, ledger.earnings_for(provider))
    record_audit_run(source="beat")
    requested: list[str] = []
    console_errors: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)

    page.goto(f"{live_server.url}/ops/")
    assert "/admin/login/" in page.url  # staff only
    staff_log_in(page, "operator", PASSWORD)
    assert page.url == f"{live_server.url}/ops/"
    # From here on, only the dashboard's own loading counts (the admin's login page has no
    # favicon link, and Chromium logs the 404 of its guess at /favicon.ico as an error).
    requested.clear()
    console_errors.clear()
    page.goto(f"{live_server.url}/ops/")

    assert page.title() == "MOLT · Operations"
    for chart in ("revenue-chart", "bandwidth-chart", "jobs-chart"):
        svg = page.locator(f"#{chart} svg")
        assert svg.is_visible()
        box = svg.bounding_box()
        assert box["width"] > 200 and box["height"] > 50, chart
        heights = drawn_bars(page, chart)
        assert heights and max(heights) > 10, (chart, heights)
        assert page.locator(f"#{chart} [data-chart-empty]").count() == 0
    # Today's bar is the tallest revenue bar (every settlement of the seed is from today).
    revenue = drawn_bars(page, "revenue-chart")
    assert revenue[-1] == max(revenue) and sum(1 for h in revenue if h > 0) == 1
    # Jobs by state: completed (4) twice the height of failed (2).
    jobs = dict(
        zip(
            [text.strip() for text in page.locator("#jobs-table th").all_text_contents()],
            drawn_bars(page, "jobs-chart"),
            strict=True,
        )
    )
    assert jobs["completed"] == pytest.approx(2 * jobs["failed"], rel=0.05)
    assert page.locator("#nodes-online").inner_text() != "0"
    assert page.locator("#audit-result").inner_text() == "OK"
    # Failures only: the 2 orders their buyers cancelled are not in it.
    assert page.locator("#failed-orders tbody tr").count() == 2
    # Each bar of the jobs chart is labelled with its state and count, under it.
    labels = [
        tuple(text.split())
        for text in page.locator("#jobs-chart [data-bar-labels] span").all_inner_texts()
    ]
    table = zip(
        page.locator("#jobs-table th").all_text_contents(),
        page.locator("#jobs-table td").all_text_contents(),
        strict=True,
    )
    assert labels == [(count.strip(), state.strip()) for state, count in table], labels
    # The factories' nodes declare eu-west: their addresses are counted in that region's pool.
    assert page.locator("#pool-eu-west meter").get_attribute("value") not in (None, "0")
    # The queues: no dispute; the payout with its age, linking to its admin page.
    assert page.locator("#no-disputes").is_visible()
    row = page.locator(f'#payout-queue tr[data-payout-id="{payout.pk}"]')
    assert row.locator("td.age").inner_text().strip() in ("0\xa0minutes", "0 minutes")
    assert row.locator("a").get_attribute("href").endswith(f"/payoutrequest/{payout.pk}/change/")

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ops-dashboard.png"), full_page=True)
    assert requested and all(url.startswith(live_server.url) for url in requested), requested
    assert console_errors == []
