"""The marketplace on a phone and on a laptop (issue 12 item 6), in Debian's Chromium: at
390x844 every listing shows its price per GPU-hour and its free GPUs with no sideways scrolling;
the order page's five progress steps stay on one row; at 1366 px the provider column is inside
the table's box, not behind a scroll. Screenshots go to test-artifacts/browser/."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command
from django.test import override_settings
from django.utils import timezone

from marketplace.demo_data import BUYER
from marketplace.models import Listing, Order
from marketplace.orders import place_order
from meshnet.models import Node
from tests.browser.conftest import ARTIFACTS
from tests.factories import wg_public_key

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True), pytest.mark.postgres]

PHONE = {"width": 390, "height": 844}
LAPTOP = {"width": 1366, "height": 768}


@pytest.fixture
def market(django_user_model):
    """The demo market, its nodes seen just now (so a marketplace that hides offline nodes
    lists them), and one order of the demo buyer's."""
    with override_settings(DEBUG=True, MOLT_ALLOW_SIMULATED_GPUS=True):
        call_command("seed_demo", stdout=StringIO())
    Node.objects.update(last_seen_at=timezone.now())
    listing = Listing.objects.available().order_by("pk").first()
    order = place_order(
        django_user_model.objects.get(username=BUYER.username),
        listing_id=listing.pk,
        gpu_count=1,
        hours=1,
        wireguard_public_key=wg_public_key(),
    )
    return {"listings": Listing.objects.available().count(), "order": order}


def sideways_overflow(page) -> int:
    """How many pixels the page is wider than the window (0: no sideways scrolling)."""
    return page.evaluate(
        "Math.max(document.documentElement.scrollWidth, document.body.scrollWidth)"
        " - window.innerWidth"
    )


def test_a_phone_shows_every_listings_price_and_free_gpus_without_scrolling_sideways(
    live_server, market, browser_page
):
    page = browser_page
    page.set_viewport_size(PHONE)
    page.goto(f"{live_server.url}/")

    rows = page.locator("#listings tbody tr")
    assert rows.count() == market["listings"] > 0
    assert sideways_overflow(page) <= 0
    for i in range(rows.count()):
        row = rows.nth(i)
        for cell in (".c-hour", ".c-free", ".c-gpu"):
            box = row.locator(cell).bounding_box()
            assert box is not None and box["width"] > 0, (i, cell)
            assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], (i, cell, box)
        assert row.locator(".c-hour").inner_text().startswith("$")
        # Without the table's header the cell says what it is.
        label = row.locator(".c-hour").evaluate("el => getComputedStyle(el, '::before').content")
        assert label == '"Per GPU-hour: "', label
    # The less important columns are on the listing's own page, not in the phone's cards.
    assert not rows.first.locator(".c-owner").is_visible()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "phone-marketplace.png"), full_page=False)
    page.screenshot(path=str(ARTIFACTS / "phone-marketplace-full.png"), full_page=True)


def test_at_1366_px_the_provider_column_is_inside_the_table(live_server, market, browser_page):
    page = browser_page
    page.set_viewport_size(LAPTOP)
    page.goto(f"{live_server.url}/")

    wrap = page.locator(".table-wrap")
    scroll, client = wrap.evaluate("el => [el.scrollWidth, el.clientWidth]")
    assert scroll <= client, (scroll, client)
    box = wrap.bounding_box()
    for cell in page.locator("#listings tbody td.c-owner").all():
        owner = cell.bounding_box()
        assert owner["x"] + owner["width"] <= box["x"] + box["width"] + 0.5
    assert sideways_overflow(page) <= 0
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "marketplace-1366.png"), full_page=False)


def test_on_a_phone_the_order_progress_steps_fit_one_row(live_server, market, browser_page):
    page = browser_page
    page.goto(f"{live_server.url}/accounts/login/")
    page.fill("#id_username", BUYER.username)
    page.fill("#id_password", BUYER.password)
    with page.expect_navigation():
        page.press("#id_password", "Enter")
    page.set_viewport_size(PHONE)
    order: Order = market["order"]
    page.goto(f"{live_server.url}/orders/{order.pk}/")

    tops = page.locator("#steps li").evaluate_all("items => items.map(li => li.offsetTop)")
    assert len(tops) == 5 and len(set(tops)) == 1, tops
    assert sideways_overflow(page) <= 0
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "phone-order.png"), full_page=False)
