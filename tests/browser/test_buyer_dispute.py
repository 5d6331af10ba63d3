"""A buyer disputes a settled order from its page in Debian's Chromium against the real
gateway (uvicorn + a Celery worker, Redis, PostgreSQL), and an operator resolves it in the
admin in a browser of their own.

The orders are placed, run, stopped and settled through the real services (no agent is needed
once an order has settled). On the order page the buyer sees until when the order can be
disputed, cancels once at the confirmation (from the keyboard: nothing is sent), then
double-clicks "Open a dispute": one confirmation, one request carrying an Idempotency-Key,
progress while it runs, and the dispute shows as open, in this tab and, live, in a second tab
of the same order. An order whose window closed while its page was open is refused with the
server's reason and the panel redraws. The operator refunds part of the charge in the admin;
the buyer's page shows the outcome live (no reload), the receipt shows the refund, the wallet
has the refund and the orders list a badge. Screenshots go to test-artifacts/browser/.
"""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone
from django_otp.plugins.otp_totp.models import TOTPDevice

from marketplace import ledger, payments
from marketplace.listings import create_listing
from marketplace.models import Dispute, Order
from marketplace.orders import place_order, provision_order, stop_order
from meshnet.agent_channel import acknowledge_revision
from meshnet.models import Node
from tests.browser.conftest import staff_log_in
from tests.browser.test_buyer_flow import usd
from tests.factories import enrolled_node, gpu, wg_public_key
from tests.integration.conftest import gateway  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.browser, pytest.mark.postgres]

PASSWORD = "my-gpu-hour-was-slow-3"
REFUND = 1_250_000  # what the operator types: 1.25 USD


def shot(page, name: str) -> None:
    from tests.browser.conftest import ARTIFACTS

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"dispute-{name}.png"), full_page=True)


def ack(node: Node, at=None) -> None:
    acknowledge_revision(node, Node.objects.get(pk=node.pk).desired_revision, at=at)


def settled_order(buyer, listing) -> Order:
    """An order that ran an hour, then was stopped, removed by the node and settled."""
    order = place_order(
        buyer, listing_id=listing.pk, gpu_count=1, hours=2, wireguard_public_key=wg_public_key()
    )
    provision_order(order.pk)
    ack(listing.node, at=timezone.now() - timedelta(hours=1))
    stop_order(Order.objects.get(pk=order.pk))
    ack(listing.node)
    order = Order.objects.select_related("settlement", "earnings_hold").get(pk=order.pk)
    assert order.state == "completed" and order.settlement.captured > REFUND
    return order


def log_in(page, base: str, username: str, next_path: str) -> None:
    page.goto(f"{base}/accounts/login/?next={next_path}")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    with page.expect_navigation():
        page.click("#login-submit")


@pytest.fixture
def market(gateway, provider):  # noqa: F811
    """Carol's two settled orders and an operator; made before the browser starts, so the
    services' announcements run outside Playwright's event loop."""
    users = get_user_model()
    carol = users.objects.create_user("carol", password=PASSWORD)
    olga = users.objects.create_superuser("olga", password=PASSWORD)
    # Staff give a TOTP code too (frontend/staff_otp.py): their authenticator app's device.
    TOTPDevice.objects.create(user=olga, name="phone", confirmed=True)
    ledger.grant_credits(carol, 100_000_000)
    node = enrolled_node(provider, gpus=[gpu(0), gpu(1)])
    listing = create_listing(
        provider, node=node, gpu_count=2, price_per_gpu_hour=3_600_000, price_per_gib=100_000
    )
    return carol, settled_order(carol, listing), settled_order(carol, listing)


def test_a_buyer_disputes_a_settled_order_and_sees_the_operators_refund(
    gateway,  # noqa: F811
    market,
    browser_page,
):
    from playwright.sync_api import expect

    page = browser_page
    base = gateway.base_url
    carol, order, late = market
    captured = order.settlement.captured

    console_errors: list[str] = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    urls: list[str] = []
    dispute_posts: list[dict[str, str]] = []
    dispute_url = f"{base}/api/v1/orders/{order.pk}/dispute/"

    def on_request(request) -> None:
        urls.append(request.url)
        if request.method == "POST" and request.url == dispute_url:
            dispute_posts.append(request.headers)

    page.on("request", on_request)
    dialogs: list[str] = []
    answer = {"accept": False}

    def on_dialog(dialog) -> None:
        dialogs.append(dialog.message)
        if answer["accept"]:
            dialog.accept()
        else:
            dialog.dismiss()

    page.on("dialog", on_dialog)

    # 1. The order page offers a dispute, saying until when.
    log_in(page, base, "carol", f"/orders/{order.pk}/")
    assert page.url == f"{base}/orders/{order.pk}/"
    page.evaluate("window.__sameDocument = true")  # gone if the page reloads
    expect(page.locator("#live-status")).to_have_text("live")
    expect(page.locator("#dispute-form")).to_be_visible()
    ends = order.earnings_hold.release_after
    expect(page.locator("#dispute-window-ends")).to_have_text(f"{ends:%Y-%m-%d %H:%M:%S} UTC")
    shot(page, "form")

    # A second tab of the same order, to see the dispute arrive there live.
    other = page.context.new_page()
    other.goto(f"{base}/orders/{order.pk}/")
    expect(other.locator("#live-status")).to_have_text("live")
    other.evaluate("window.__sameDocument = true")

    # 2. From the keyboard: type the reason, Tab to the button, Enter; cancel at the question.
    reason = "The GPU was throttled to half speed\nfor most of the hour."
    page.focus("#dispute-reason")
    page.keyboard.type(reason)
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "dispute-submit"
    page.keyboard.press("Enter")
    expect(page.locator("#dispute-form")).to_be_visible()
    assert len(dialogs) == 1 and f"Dispute order #{order.pk}?" in dialogs[0]
    assert usd(captured) in dialogs[0] and "cannot withdraw" in dialogs[0]
    assert dispute_posts == [] and not Dispute.objects.exists()

    # 3. A double-click: one confirmation, one request, progress shown while it runs.
    page.evaluate(
        """() => {
          window.__seen = [];
          const note = () => {
            const status = document.getElementById("dispute-status");
            const button = document.getElementById("dispute-submit");
            window.__seen.push({
              kind: status ? status.className : "",
              text: status ? status.textContent : "",
              disabled: button ? button.disabled : null,
            });
          };
          new MutationObserver(note).observe(document.getElementById("panels"),
            { subtree: true, childList: true, attributes: true, characterData: true });
        }"""
    )
    answer["accept"] = True
    page.dblclick("#dispute-submit")
    expect(page.locator("#dispute-state")).to_have_text("open")
    expect(page.locator("#order-state")).to_have_text("disputed")
    expect(page.locator("#dispute-status")).to_contain_text("Dispute opened")
    expect(page.locator("#dispute-reason-text")).to_have_text(reason)
    expect(page.locator("#dispute-form")).to_have_count(0)
    assert len(dialogs) == 2
    assert len(dispute_posts) == 1
    assert re.fullmatch(r"[0-9a-f-]{36}", dispute_posts[0]["idempotency-key"])
    seen = page.evaluate("window.__seen")
    assert any(
        "busy" in s["kind"] and s["text"] == "Opening your dispute…" and s["disabled"] is True
        for s in seen
    ), seen
    assert page.evaluate("document.activeElement.id") == "dispute-title"  # focus not lost
    dispute = Dispute.objects.get(order=order)
    assert (dispute.state, dispute.reason) == ("open", reason)
    assert Order.objects.get(pk=order.pk).state == "disputed"
    shot(page, "open")
    # The other tab heard it over the websocket.
    expect(other.locator("#dispute-state")).to_have_text("open")
    expect(other.locator("#order-state")).to_have_text("disputed")
    assert other.evaluate("window.__sameDocument === true")
    other.close()

    # 4. Refused: the window of the other order closes while its page is open (the beat task
    # releases the provider's share), and the buyer is told why.
    page.goto(f"{base}/orders/{late.pk}/")
    expect(page.locator("#dispute-form")).to_be_visible()
    assert payments.release_due_earnings(now=late.earnings_hold.release_after) == 1
    page.fill("#dispute-reason", "Too late?")
    page.click("#dispute-submit")
    closed = late.earnings_hold.release_after
    expect(page.locator("#dispute-status")).to_have_text(
        f"Your dispute was not opened: the dispute window of order {late.pk} closed at "
        f"{closed:%Y-%m-%d %H:%M:%S} UTC"
    )
    expect(page.locator("#dispute-status")).to_have_class(re.compile(r"\berror\b"))
    expect(page.locator("#dispute-closed")).to_be_visible()  # the panel redrew
    expect(page.locator("#dispute-form")).to_have_count(0)
    assert not Dispute.objects.filter(order=late).exists()
    shot(page, "refused")

    # 5. The operator resolves the dispute in the admin with a partial refund.
    page.goto(f"{base}/orders/{order.pk}/")
    page.evaluate("window.__sameDocument = true")
    expect(page.locator("#live-status")).to_have_text("live")
    page.focus("#dispute-title")  # a keyboard or screen-reader user reading the panel
    before = ledger.available_for(carol)
    operator = page.context.browser.new_context(viewport={"width": 1280, "height": 900})
    admin = operator.new_page()
    staff_log_in(admin, "olga", PASSWORD, f"{base}/admin/login/?next=/admin/marketplace/dispute/")
    admin.check(f'input[name="_selected_action"][value="{dispute.pk}"]')
    admin.select_option('select[name="action"]', "resolve")
    with admin.expect_navigation():
        admin.click('button[name="index"]')
    expect(admin.locator("#content")).to_contain_text("The GPU was throttled")
    admin.fill("#id_refund", "1.25")
    admin.fill("#id_note", "Throttled for half the hour: refunded a share.")
    shot(admin, "admin-resolve")
    with admin.expect_navigation():
        admin.click('input[type=submit][value="Resolve"]')
    expect(admin.locator(".messagelist")).to_contain_text(
        f"Dispute of order {order.pk}: refunded $1.25."
    )
    operator.close()

    # 6. The buyer's open page shows the outcome without a reload.
    expect(page.locator("#order-state")).to_have_text("resolved", timeout=15_000)
    expect(page.locator("#dispute-state")).to_have_text("resolved with a refund")
    expect(page.locator("#dispute-refund")).to_have_text(usd(REFUND))
    expect(page.locator("#dispute-note")).to_have_text(
        "Throttled for half the hour: refunded a share."
    )
    expect(page.locator("#receipt-refunded")).to_have_text(usd(REFUND))
    expect(page.locator("#receipt-net-paid")).to_have_text(usd(captured - REFUND))
    expect(page.locator("#dispute-status")).to_contain_text("An operator resolved your dispute")
    assert page.evaluate("window.__sameDocument === true")
    # The panel was redrawn under the reader: focus is where it was, not back at the top.
    assert page.evaluate("document.activeElement.id") == "dispute-title"
    assert ledger.available_for(carol) == before + REFUND
    page.locator("#panel-dispute").scroll_into_view_if_needed()
    shot(page, "resolved")

    # 7. The wallet has the refund; the orders list marks both orders.
    page.goto(f"{base}/wallet/")
    newest = page.locator("#history tbody tr").first
    expect(newest).to_contain_text(f"dispute of order {order.pk}")
    expect(newest).to_contain_text(f"+{usd(REFUND)}")
    expect(page.locator("#wallet-available")).to_have_text(usd(before + REFUND))
    shot(page, "wallet")
    page.goto(f"{base}/orders/")
    row = page.locator(f'#orders tr[data-order-id="{order.pk}"]')
    expect(row.locator(".state-badge")).to_have_text("resolved")
    expect(row.locator("[data-dispute]")).to_have_text(f"refunded {usd(REFUND)}")
    expect(page.locator(f'#orders tr[data-order-id="{late.pk}"] [data-dispute]')).to_have_count(0)
    shot(page, "orders")

    # The one refused request, which Chromium logs itself; the page's script logged nothing.
    assert console_errors == [
        "Failed to load resource: the server responded with a status of 409 (Conflict)"
    ]
    assert all(url.startswith(base) for url in urls), urls
