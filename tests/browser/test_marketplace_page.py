"""Debian's Chromium, driven by Playwright, against a live server holding the demo market: the
page renders with its own stylesheet, loads nothing from elsewhere, its filter form narrows
the rows, and an offline node's listings show only when asked for, marked offline. Screenshots
go to test-artifacts/browser/."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command
from django.test import override_settings
from django.utils import timezone

from marketplace.models import Listing
from meshnet.models import Node
from tests.browser.conftest import ARTIFACTS

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True), pytest.mark.postgres]


@pytest.fixture
def market():
    with override_settings(DEBUG=True, MOLT_ALLOW_SIMULATED_GPUS=True):
        call_command("seed_demo", stdout=StringIO())
    # The demo's nodes have no agents here: every node heard from just now but one, offline.
    offline = Listing.objects.available().filter(region="eu-west").first().node
    Node.objects.exclude(pk=offline.pk).update(last_seen_at=timezone.now())
    hidden = Listing.objects.available().filter(node=offline).count()
    return {
        "offline": hidden,
        "all": Listing.objects.available().count() - hidden,
        "asia": Listing.objects.available().filter(region="asia").count(),
    }


def test_a_person_filters_the_marketplace_by_region(live_server, market, browser_page):
    page = browser_page
    requested: list[str] = []
    failed: list[str] = []
    console_errors: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.on("requestfailed", lambda request: failed.append(request.url))
    page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)

    response = page.goto(f"{live_server.url}/")

    assert response is not None and response.status == 200
    assert page.title() == "MOLT · GPU marketplace"
    rows = page.locator("#listings tbody tr")
    assert rows.count() == market["all"]
    # The local stylesheet is loaded and applied (the header is dark, not the default white).
    header_bg = page.evaluate("getComputedStyle(document.querySelector('.topbar')).backgroundColor")
    assert header_bg == "rgb(15, 23, 42)"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "marketplace.png"), full_page=True)

    page.select_option("#id_region", "asia")
    with page.expect_navigation():
        page.click("form.filters button[type=submit]")

    assert "region=asia" in page.url
    assert 0 < market["asia"] < market["all"]
    assert rows.count() == market["asia"]
    regions = page.locator("#listings tbody tr .region").all_inner_texts()
    assert regions == ["asia"] * market["asia"]
    assert page.input_value("#id_region") == "asia"  # the form keeps the chosen filter
    page.screenshot(path=str(ARTIFACTS / "marketplace-asia.png"), full_page=True)

    with page.expect_navigation():
        page.click("text=Clear filters")
    assert rows.count() == market["all"]

    # The offline node's listings: hidden, then shown marked offline, with "never seen".
    page.check("#id_show_offline")
    with page.expect_navigation():
        page.click("form.filters button[type=submit]")
    assert rows.count() == market["all"] + market["offline"]
    offline_rows = page.locator("#listings tbody tr.offline")
    assert offline_rows.count() == market["offline"] > 0
    assert "offline" in offline_rows.first.inner_text()
    assert "never seen" in offline_rows.first.inner_text()
    page.screenshot(path=str(ARTIFACTS / "marketplace-offline-shown.png"), full_page=True)

    assert requested and all(url.startswith(live_server.url) for url in requested), requested
    assert failed == []
    assert console_errors == []
