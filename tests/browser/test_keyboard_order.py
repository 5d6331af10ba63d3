"""Ordering with the keyboard alone (issue 12 item 5): type the hours, Tab onto the Order button
and press Enter. The price refresh that follows the typing used to disable the button under the
focus, so focus fell to <body> and Enter did nothing, with no message."""

from __future__ import annotations

import re

import pytest

from marketplace import ledger
from marketplace.listings import create_listing
from marketplace.models import Order
from marketplace.ssh_keys import add_ssh_key
from tests.browser.conftest import ARTIFACTS
from tests.factories import USD, enrolled_node, gpu, ssh_public_key

pytestmark = [pytest.mark.browser]

PASSWORD = "tab-tab-enter-order-5"


@pytest.fixture
def keyboard_market(make_user):
    """A listing and a buyer with credits and an SSH key, made before the browser starts (its
    event loop would hold this thread)."""
    provider = make_user("kbd-provider")
    node = enrolled_node(provider, gpus=[gpu(0), gpu(1)])
    listing = create_listing(
        provider, node=node, gpu_count=2, price_per_gpu_hour=2 * USD, price_per_gib=10_000
    )
    buyer = make_user("kbd-buyer")
    buyer.set_password(PASSWORD)
    buyer.save()
    ledger.grant_credits(buyer, 500 * USD)
    add_ssh_key(buyer, public_key=ssh_public_key("kbd@laptop"), name="laptop")
    return listing, buyer


def test_type_the_hours_tab_to_order_and_press_enter(live_server, keyboard_market, browser_page):
    listing, buyer = keyboard_market
    page = browser_page
    console_errors: list[str] = []
    page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)

    page.goto(f"{live_server.url}/accounts/login/")
    page.fill("#id_username", "kbd-buyer")
    page.fill("#id_password", PASSWORD)
    with page.expect_navigation():
        page.press("#id_password", "Enter")
    page.goto(f"{live_server.url}/listings/{listing.pk}/")
    page.wait_for_function(
        "() => document.getElementById('order-button').textContent.includes('$')"
    )

    page.click("#id_hours")
    page.keyboard.press("Control+A")
    page.keyboard.type("3")
    page.keyboard.press("Tab")  # to the GPU count
    page.keyboard.press("Control+A")
    page.keyboard.type("2")
    page.keyboard.press("Tab")  # to Order
    # The debounced re-price (250 ms) and its answer come and go while the focus is on Order.
    page.wait_for_function(
        "() => document.getElementById('quote').getAttribute('aria-busy') === 'false'"
        " && document.getElementById('order-button').textContent.includes('$')"
    )
    page.wait_for_timeout(400)
    focused = page.evaluate("document.activeElement && document.activeElement.id")
    assert focused == "order-button"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "keyboard-order-focus.png"), full_page=True)
    # Checked before the order page opens: this live server speaks WSGI, so the order page's
    # websocket answers 404 here (test_buyer_flow covers it on the ASGI gateway).
    assert console_errors == []

    with page.expect_navigation(url=re.compile(r"/orders/\d+/$"), timeout=30_000):
        page.keyboard.press("Enter")

    order = Order.objects.get(buyer=buyer)
    assert (order.hours, order.gpu_count) == (3, 2)
    assert page.url.endswith(f"/orders/{order.pk}/")
