"""A card top-up in Debian's Chromium against the real gateway (uvicorn + Celery worker,
PostgreSQL, Redis) and the local stand-in of Stripe (tests/stripe_standin.py): the buyer types
an amount on the wallet page and presses "Pay with card"; the gateway starts a Checkout session
at the stand-in and the browser follows it to the stand-in's hosted checkout page (through the
wallet page's Content-Security-Policy, which lets the form go there); "Pay" sends the browser
back to the top-up's page, which says it is waiting for Stripe; the stand-in then delivers the
signed `checkout.session.completed` webhook to the gateway over HTTP, the waiting page
refreshes into "Paid", and the wallet shows the credit once. A cancelled checkout says nothing
was charged. Screenshots go to test-artifacts/browser/card-*.png.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from marketplace import ledger
from marketplace.audit import audit_ledger
from marketplace.models import CheckoutSession, LedgerTransaction
from tests.browser.conftest import ARTIFACTS
from tests.factories import USD
from tests.integration.conftest import running_gateway
from tests.stripe_standin import StripeStandIn

pytestmark = [pytest.mark.browser, pytest.mark.postgres]


@pytest.fixture
def stripe_gateway(transactional_db, tmp_path, settings, monkeypatch) -> Iterator:
    """The stand-in, and a gateway whose Stripe settings point at it."""
    # Delivered a moment after the buyer is sent back, as Stripe's webhooks often are.
    with StripeStandIn(
        api_key="sk_test_browser_flow", webhook_secret="whsec_browser_flow", deliver_delay=2.0
    ) as standin:
        monkeypatch.setenv("STRIPE_SECRET_KEY", standin.api_key)
        monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", standin.webhook_secret)
        monkeypatch.setenv("STRIPE_API_BASE", standin.base_url)
        monkeypatch.setenv("STRIPE_CHECKOUT_ORIGIN", standin.base_url)
        with running_gateway(tmp_path, settings) as gw:
            standin.webhook_url = f"{gw.base_url}/stripe/webhook/"
            yield gw, standin


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"card-{name}.png"), full_page=True)


def log_in(page, base: str, username: str) -> None:
    page.goto(f"{base}/accounts/login/?next=/wallet/")
    page.fill("#id_username", username)
    page.fill("#id_password", f"{username}-pass-123")
    page.click("#login-submit")
    page.wait_for_url(f"{base}/wallet/")


def test_wallet_top_up_by_card_through_the_stripe_stand_in(stripe_gateway, browser_page, buyer):
    gw, standin = stripe_gateway
    page, base = browser_page, gw.base_url
    refused: list[str] = []
    page.on("console", lambda m: refused.append(m.text) if "Content Security" in m.text else None)

    log_in(page, base, buyer.username)
    assert page.locator("#wallet-available").inner_text() == "$0.00"
    page.fill("#id_amount", "3")
    page.click("#pay-with-card")
    assert "between $5 and $1,000" in page.locator("#card-form").inner_text()
    assert CheckoutSession.objects.count() == 0

    page.fill("#id_amount", "42.50")
    shot(page, "1-wallet")
    page.click("#pay-with-card")

    # Stripe's (stand-in's) hosted page.
    page.wait_for_url(f"{standin.base_url}/c/pay/cs_test_*")
    assert page.locator("#checkout-amount").inner_text() == "Pay $42.50"
    shot(page, "2-checkout")
    row = CheckoutSession.objects.get()
    assert row.state == "open" and row.amount == 42_500_000
    page.click("#submit-payment")

    # Back on the gateway before the webhook: waiting, nothing credited yet.
    page.wait_for_url(f"{base}/wallet/card/{row.pk}/")
    assert "Waiting for Stripe to confirm" in page.locator("#top-up-state").inner_text()
    assert ledger.available_for(buyer) == 0
    shot(page, "3-pending")

    # The signed webhook arrives; the page refreshes itself into "Paid".
    page.locator("#top-up-paid").wait_for(timeout=30_000)
    assert "$42.50 was added to your wallet" in page.locator("#top-up-paid").inner_text()
    shot(page, "4-paid")
    assert [status for _, _, status in standin.deliveries] == [200]

    page.click("#back-to-wallet")
    assert page.locator("#wallet-available").inner_text() == "$42.50"
    assert "card top-up (Stripe Checkout)" in page.locator("#history").inner_text()
    assert "paid and credited" in page.locator("#card-top-ups").inner_text()
    shot(page, "5-wallet-credited")

    # Stripe redelivers the same event: 200, nothing more credited.
    event_id = standin.deliveries[0][0]
    session = standin.sessions[row.stripe_session_id]
    replay = standin.event(session, "checkout.session.completed")
    replay["id"] = event_id
    assert standin.deliver(replay) == 200
    assert ledger.available_for(buyer) == 42 * USD + 500_000
    assert LedgerTransaction.objects.filter(kind="card").count() == 1

    # A second checkout, abandoned: the cancel page says nothing was charged.
    page.goto(f"{base}/wallet/")
    page.fill("#id_amount", "10")
    page.click("#pay-with-card")
    page.wait_for_url(f"{standin.base_url}/c/pay/cs_test_*")
    page.click("#cancel-checkout")
    page.wait_for_url(f"{base}/wallet/card/*/?cancelled=1")
    assert "nothing was charged" in page.locator("#top-up-cancelled").inner_text()
    shot(page, "6-cancelled")

    assert ledger.available_for(buyer) == 42_500_000
    assert refused == [], refused
    assert audit_ledger() == []


def test_without_stripe_keys_the_wallet_says_card_payments_are_off(
    transactional_db, tmp_path, settings, monkeypatch, browser_page, buyer
):
    for name in ("STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET"):
        monkeypatch.delenv(name, raising=False)
    with running_gateway(tmp_path, settings) as gw:
        log_in(browser_page, gw.base_url, buyer.username)
        text = browser_page.locator("#card-top-up").inner_text()
        assert "Card payments are not configured" in text
        assert browser_page.locator("#pay-with-card").count() == 0
        shot(browser_page, "7-disabled")
