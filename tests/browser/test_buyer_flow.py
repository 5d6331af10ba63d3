"""A buyer's whole rental in Debian's Chromium against the real gateway (uvicorn + a Celery
worker, Redis, PostgreSQL) with a real clawnode daemon connected through the real websocket
(its WireGuard backend is the in-memory FakeBackend, the one stand-in allowed here).

The buyer signs up, gets credits from an operator's admin action, filters the marketplace,
opens a listing, orders with a key pair made by the browser, sees the order turn provisioning
and then running without a reload (the agent connects only after the page is open), downloads
a config that `wg` accepts and whose private key belongs to the order's public key, sees the QR
code and the usage chart, loses the key and re-keys (the agent swaps the peer), stops the order
and reads the receipt; and nothing the page sent or received (requests, their bodies, websocket
frames) ever contained a private key. Screenshots of every page go to test-artifacts/browser/.
"""

from __future__ import annotations

import re
import subprocess
import urllib.parse
from pathlib import Path

import pytest
from clawnode.backends.memory import FakeBackend
from django_otp.plugins.otp_totp.models import TOTPDevice

from marketplace import ledger
from marketplace.listings import create_listing
from marketplace.models import Order
from marketplace.money import format_usd
from marketplace.orders import quote_for
from meshnet.models import Node
from tests.browser.conftest import ARTIFACTS, staff_log_in
from tests.factories import enrolled_node, gpu, ssh_public_key
from tests.integration.conftest import gateway, wait_until  # noqa: F401  (the gateway fixture)
from tests.integration.test_agent_daemon import (  # noqa: F401  (provider_node is a fixture)
    RunningAgent,
    make_agent,
    provider_node,
)

pytestmark = [pytest.mark.browser, pytest.mark.postgres]

PASSWORD = "rent-a-gpu-by-the-hour-7"


class Traffic:
    """Everything the page sent or received over the network, as text."""

    def __init__(self) -> None:
        self.urls: list[str] = []
        self.requests: list[str] = []
        self.frames: list[str] = []

    def on_request(self, request) -> None:
        body = request.post_data_buffer or b""
        self.urls.append(request.url)
        self.requests.append(
            f"{request.method} {request.url}\n{request.headers}\n{body.decode('latin-1')}"
        )

    def on_websocket(self, ws) -> None:
        self.frames.append(f"open {ws.url}")
        ws.on("framesent", lambda payload: self.frames.append(f"sent {payload!s}"))
        ws.on("framereceived", lambda payload: self.frames.append(f"received {payload!s}"))

    def everything(self) -> str:
        return "\n".join(self.requests + self.frames)


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"buyer-{name}.png"), full_page=True)


def usd(micro: int) -> str:
    """The pages' spelling of an amount: marketplace.money's, the one place money is formatted."""
    return format_usd(micro)


def download_config(page, tmp_path: Path, order: Order) -> str:
    """Download the order's config from the page, check that `wg` accepts it and that its
    private key belongs to the order's public key; return the private key."""
    with page.expect_download() as download_info:
        page.click("#download-config")
    download = download_info.value
    assert download.suggested_filename == f"molt-order-{order.pk}.conf"
    path = tmp_path / download.suggested_filename
    path.unlink(missing_ok=True)
    download.save_as(str(path))
    config = path.read_text()
    private_key = re.search(r"^PrivateKey = (\S+)$", config, re.M).group(1)
    assert "# PrivateKey" not in config
    assert f"Address = {order.job_peer.address}/32" in config
    stripped = subprocess.run(
        ["wg-quick", "strip", str(path)], capture_output=True, text=True, check=False
    )
    assert stripped.returncode == 0, stripped.stderr
    assert f"PrivateKey = {private_key}" in stripped.stdout
    derived = subprocess.run(
        ["wg", "pubkey"], input=private_key + "\n", capture_output=True, text=True, check=True
    ).stdout.strip()
    assert derived == order.wireguard_public_key
    return private_key


def test_a_buyer_rents_a_gpu_in_the_browser_and_the_private_key_never_leaves_it(
    gateway,  # noqa: F811
    provider,
    provider_node,  # noqa: F811
    browser_page,
    tmp_path,
):
    from django.contrib.auth import get_user_model
    from playwright.sync_api import expect

    page = browser_page
    base = gateway.base_url
    assert base.startswith("http://127.0.0.1:")  # a secure context for WebCrypto
    traffic = Traffic()
    page.on("request", traffic.on_request)
    page.on("websocket", traffic.on_websocket)
    console_errors: list[str] = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    page.on("dialog", lambda dialog: dialog.accept())

    # The market: the daemon's node in eu-west, and a node in asia with no agent.
    _identity, node, _state, _enrollment = provider_node
    Node.objects.filter(pk=node.pk).update(region="eu-west")
    node.refresh_from_db()
    listing = create_listing(
        provider, node=node, gpu_count=2, price_per_gpu_hour=3_600_000, price_per_gib=100_000
    )
    far = enrolled_node(provider, gpus=[gpu(0, name="H100 80GB", memory_mb=81559)], region="asia")
    create_listing(provider, node=far, gpu_count=1, price_per_gpu_hour=2_000_000, price_per_gib=0)

    # 1. Sign up.
    page.goto(f"{base}/accounts/signup/")
    shot(page, "signup")
    page.fill("#id_username", "carol")
    page.fill("#id_password1", PASSWORD)
    page.fill("#id_password2", PASSWORD)
    with page.expect_navigation():
        page.click("#signup-submit")
    expect(page.locator("#nav-user")).to_have_text("carol")
    carol = get_user_model().objects.get(username="carol")

    # 2. Credits from an operator: the admin's grant action, in the operator's own browser.
    olga = get_user_model().objects.create_superuser("olga", password=PASSWORD)
    # Staff give a TOTP code too (frontend/staff_otp.py): their authenticator app's device.
    TOTPDevice.objects.create(user=olga, name="phone", confirmed=True)
    operator = page.context.browser.new_context(viewport={"width": 1280, "height": 900})
    admin = operator.new_page()
    staff_log_in(admin, "olga", PASSWORD, f"{base}/admin/login/?next=/admin/auth/user/")
    admin.check(f'input[name="_selected_action"][value="{carol.pk}"]')
    admin.select_option('select[name="action"]', "grant_credits")
    with admin.expect_navigation():
        admin.click('button[name="index"]')
    admin.fill("#id_amount", "100")
    admin.fill("#id_memo", "welcome credits")
    shot(admin, "admin-grant-credits")
    with admin.expect_navigation():
        admin.click('input[type=submit][value^="Grant"]')
    expect(admin.locator(".messagelist")).to_contain_text("Granted $100.00 to each of: carol")
    operator.close()
    assert ledger.available_for(carol) == 100_000_000

    # 2b. An SSH key on the account: an order's sandbox lets in the buyer's keys, so the
    # listing page asks for one before it offers to order.
    page.goto(f"{base}/accounts/ssh-keys/")
    page.fill("#id_public_key", ssh_public_key("carol@laptop"))
    with page.expect_navigation():
        page.click("#add-ssh-key")
    expect(page.locator("#ssh-keys tbody tr")).to_have_count(1)

    # 3. Filter the marketplace to eu-west and open the listing. Neither node's agent runs
    # yet: both are offline, so their listings show only with "show offline nodes" (the
    # form keeps it ticked across the next filter).
    page.goto(f"{base}/")
    expect(page.locator("#no-listings")).to_be_visible()
    page.check("#id_show_offline")
    with page.expect_navigation():
        page.click("form.filters button[type=submit]")
    expect(page.locator("#listings tbody tr.offline")).to_have_count(2)
    page.select_option("#id_region", "eu-west")
    with page.expect_navigation():
        page.click("form.filters button[type=submit]")
    expect(page.locator("#listings tbody tr")).to_have_count(1)
    shot(page, "marketplace-filtered")
    with page.expect_navigation():
        page.click(f'tr[data-listing-id="{listing.pk}"] a.model')
    assert page.url == f"{base}/listings/{listing.pk}/"

    # 4. The quote follows the inputs.
    expected = quote_for(listing, gpu_count=1, hours=2)
    page.fill("#id_hours", "2")
    expect(page.locator("#quote-total")).to_have_text(usd(expected.total_hold))
    expect(page.locator("#quote-time")).to_have_text(usd(expected.time_charge))
    expect(page.locator("#quote-fee")).to_have_text(usd(expected.fee))
    order_button = page.locator("#order-button")
    expect(order_button).to_be_enabled()
    expect(order_button).to_have_text(f"Order for {usd(expected.total_hold)}")
    shot(page, "listing")

    # 5. Order: the browser makes the key pair and sends only the public key. The node's agent
    # is not running yet, so the order cannot run before its page is open.
    order_button.focus()
    with page.expect_navigation(url=re.compile(r"/orders/\d+/$")):
        page.keyboard.press("Enter")  # usable without a mouse
    order_id = int(re.search(r"/orders/(\d+)/$", page.url).group(1))
    order = Order.objects.get(pk=order_id)
    assert order.buyer_id == carol.pk and order.hours == 2 and order.gpu_count == 1
    page.evaluate("window.__sameDocument = true")  # gone if the page reloads
    expect(page.locator("#order-state")).to_have_text(re.compile("^(pending|provisioning)$"))
    # The worker provisions it: pushed to the page.
    expect(page.locator("#order-state")).to_have_text("provisioning")
    expect(page.locator("#live-status")).to_have_text("live")
    shot(page, "order-provisioning")

    backend = FakeBackend()
    with RunningAgent(make_agent(provider_node, backend)):
        # 6. The daemon connects, applies the peer and acknowledges: running, pushed, no reload.
        expect(page.locator("#order-state")).to_have_text("running", timeout=30_000)
        assert page.evaluate("window.__sameDocument === true")
        order.refresh_from_db()
        assert order.state == "running"
        assert order.wireguard_public_key in backend.peers  # the agent has the buyer's peer
        expect(page.locator("#job-address")).to_have_text(order.job_peer.address)
        expect(page.locator("#key-status")).to_have_text(re.compile("^held in this browser"))
        shot(page, "order-running")

        # 7. The config, with the private key filled in by the browser.
        private_keys = [download_config(page, tmp_path, order)]

        # 8. The QR code, drawn in the page.
        page.click("#show-qr")
        expect(page.locator("#qr svg path")).to_have_count(1)
        shot(page, "order-qr")
        page.click("#show-qr")
        expect(page.locator("#qr-panel")).to_be_hidden()

        # 9. Traffic through the tunnel shows as usage and a chart.
        key = order.wireguard_public_key
        for step in range(1, 4):
            backend.add_traffic(key, rx=200_000 * step, tx=900_000 * step)
            wait_until(
                lambda step=step: Order.objects.filter(
                    pk=order_id, bytes_out__gte=sum(200_000 * s for s in range(1, step + 1))
                ).exists(),
                timeout=20,
                message="metered bytes",
            )
        expect(page.locator("#usage-chart")).to_be_visible(timeout=30_000)
        expect(page.locator("#bytes-out")).not_to_have_text("0 B")
        page.locator("#panel-usage").scroll_into_view_if_needed()
        shot(page, "order-usage")

        # 10. The key is lost (another browser, cleared storage): re-key from the page, and the
        # agent swaps the peer.
        page.evaluate("localStorage.clear()")
        page.reload()
        page.evaluate("window.__sameDocument = true")
        expect(page.locator("#key-status")).to_contain_text("not in this browser")
        expect(page.locator("#download-config")).to_be_disabled()
        shot(page, "order-key-lost")
        page.click("#rekey")
        expect(page.locator("#action-status")).to_contain_text("New key in place")
        order.refresh_from_db()
        new_key = order.wireguard_public_key
        assert new_key != key
        wait_until(
            lambda: new_key in backend.peers and key not in backend.peers,
            timeout=20,
            message="the agent to swap the peer",
        )
        assert backend.peers[new_key].allowed_ips == (f"{order.job_peer.address}/32",)
        expect(page.locator("#key-status")).to_have_text(re.compile("^held in this browser"))
        private_keys.append(download_config(page, tmp_path, order))
        assert private_keys[0] != private_keys[1]

        # 11. Stop; completed and settled, live.
        page.click("#stop")
        expect(page.locator("#order-state")).to_have_text("completed", timeout=30_000)
        expect(page.locator("#receipt")).to_be_visible(timeout=15_000)
        assert page.evaluate("window.__sameDocument === true")
        assert new_key not in backend.peers
        settlement = Order.objects.get(pk=order_id).settlement
        expect(page.locator("#receipt-released")).to_have_text(usd(settlement.released))
        expect(page.locator("#key-status")).to_contain_text("deleted")
        shot(page, "order-completed")

    # 12. The wallet, the orders and the API tokens pages.
    page.goto(f"{base}/wallet/")
    expect(page.locator("#history tbody tr")).to_have_count(3)  # grant, hold, settlement
    expect(page.locator("#history")).to_contain_text("welcome credits")
    shot(page, "wallet")
    page.goto(f"{base}/orders/")
    expect(page.locator(f'#orders tr[data-order-id="{order_id}"]')).to_contain_text("completed")
    shot(page, "orders")
    page.goto(f"{base}/accounts/tokens/")
    page.fill("#id_name", "laptop")
    with page.expect_navigation():
        page.click("#create-token")
    expect(page.locator("#new-token-value")).to_have_value(re.compile(r"^molt_"))
    shot(page, "tokens")

    # 13. On a phone: nothing sticks out sideways.
    page.set_viewport_size({"width": 390, "height": 844})
    for path, name in (
        (f"/orders/{order_id}/", "order-phone"),
        (f"/listings/{listing.pk}/", "listing-phone"),
    ):
        page.goto(f"{base}{path}")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), path
        shot(page, name)

    # The page did send the public keys (so the capture works) and never a private key.
    captured = traffic.everything()
    assert key in captured and new_key in captured
    assert any("/ws/orders/" in frame for frame in traffic.frames)
    for private_key in private_keys:
        for form in (private_key, urllib.parse.quote(private_key, safe=""), private_key[:43]):
            assert form not in captured
    assert console_errors == []
    assert all(url.startswith((base, "blob:", "data:")) for url in traffic.urls), traffic.urls
