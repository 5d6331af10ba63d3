"""Buyer and account pages through Django's test client: who sees what, what each page shows,
that API tokens are shown once and kept hashed, that no page loads anything from elsewhere,
and that each page costs a bounded number of queries. Also the API endpoints the pages use:
the quote, re-keying and disputes (the order page's dispute panel and its outcome)."""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from datetime import timedelta

import pytest
from clawnode import wire
from clawnode.keys import Identity
from django.contrib.auth import get_user_model
from django.utils import timezone

from frontend.templatetags.molt_format import usd
from marketplace import ledger, payments
from marketplace.listings import create_listing
from marketplace.models import ApiToken, Dispute, EarningsHold, Order
from marketplace.orders import place_order, provision_order, quote_for, stop_order
from marketplace.ssh_keys import add_ssh_key
from marketplace.tokens import issue_api_token
from meshnet.agent_channel import acknowledge_revision, ingest_metering
from meshnet.desired_state import desired_state
from meshnet.enrolment import create_enrollment_token, enroll_node
from meshnet.models import JobPeer, Node
from tests.factories import enroll_request, enrolled_node, gpu, ssh_public_key, wg_public_key

pytestmark = [pytest.mark.db, pytest.mark.django_db]

PASSWORD = "a-long-passphrase-42"


def login(client, user) -> None:
    client.force_login(user)


@pytest.fixture
def node_identity(provider):
    identity = Identity.generate()
    issued = create_enrollment_token(provider)
    node = enroll_node(
        enroll_request(identity, issued.token, gpus=[gpu(0), gpu(1)]), observed_ip="203.0.113.9"
    ).node
    return identity, node


# Not the shared listing: on the node whose identity the tests sign as, at prices of its own.
@pytest.fixture
def listing(provider, node_identity):
    _identity, node = node_identity
    return create_listing(
        provider, node=node, gpu_count=2, price_per_gpu_hour=1_500_000, price_per_gib=20_000
    )


def ack(node: Node, at=None) -> None:
    acknowledge_revision(node, Node.objects.get(pk=node.pk).desired_revision, at=at)


@pytest.fixture
def running_order(buyer, listing):
    ledger.grant_credits(buyer, 100_000_000)
    order = place_order(
        buyer, listing_id=listing.pk, gpu_count=1, hours=2, wireguard_public_key=wg_public_key()
    )
    provision_order(order.pk)
    ack(listing.node)
    order.refresh_from_db()
    assert order.state == "running"
    return order


def text(response) -> str:
    return response.content.decode()


# --- accounts ----------------------------------------------------------------------------------


def test_sign_up_creates_the_user_and_logs_them_in(client):
    response = client.post(
        "/accounts/signup/",
        {
            "username": "carol",
            "email": "",
            "password1": PASSWORD,
            "password2": PASSWORD,
        },
    )

    assert response.status_code == 302
    user = get_user_model().objects.get(username="carol")
    assert user.check_password(PASSWORD)
    assert user.email == ""
    assert int(client.session["_auth_user_id"]) == user.pk
    assert 'id="nav-user">carol<' in text(client.get("/"))


def test_sign_up_refuses_a_weak_password_with_the_validators_message(client):
    response = client.post(
        "/accounts/signup/",
        {"username": "carol", "password1": "12345678", "password2": "12345678"},
    )

    assert response.status_code == 200
    assert "This password is too common." in text(response)
    assert "This password is entirely numeric." in text(response)
    assert not get_user_model().objects.filter(username="carol").exists()


def test_sign_up_goes_back_to_the_page_the_user_came_from(client, listing):
    target = f"/listings/{listing.pk}/"
    response = client.post(
        f"/accounts/signup/?next={target}",
        {"username": "carol", "password1": PASSWORD, "password2": PASSWORD, "next": target},
    )
    assert response.status_code == 302 and response["Location"] == target

    elsewhere = client.post(
        "/accounts/signup/",
        {"username": "dave", "password1": PASSWORD, "password2": PASSWORD, "next": "//evil.test/"},
    )
    assert elsewhere["Location"] == "/"


def test_log_in_and_log_out(client, buyer):
    page = client.get("/accounts/login/")
    assert page.status_code == 200 and 'name="password"' in text(page)

    wrong = client.post("/accounts/login/", {"username": "alice", "password": "nope"})
    assert "Please enter a correct username and password" in text(wrong)

    response = client.post("/accounts/login/", {"username": "alice", "password": "alice-pass-123"})
    assert response.status_code == 302 and response["Location"] == "/"
    assert 'id="logout"' in text(client.get("/"))

    assert client.get("/accounts/logout/").status_code == 405  # a link cannot log anyone out
    assert client.post("/accounts/logout/").status_code == 302
    assert 'id="nav-login"' in text(client.get("/"))


def test_password_change(client, buyer):
    login(client, buyer)
    response = client.post(
        "/accounts/password/",
        {"old_password": "alice-pass-123", "new_password1": PASSWORD, "new_password2": PASSWORD},
    )

    assert response.status_code == 302 and response["Location"] == "/accounts/password/done/"
    buyer.refresh_from_db()
    assert buyer.check_password(PASSWORD)
    assert client.get("/accounts/password/done/").status_code == 200  # still logged in here


@pytest.mark.parametrize(
    "path",
    ["/orders/", "/orders/1/", "/orders/1/panels/", "/wallet/", "/accounts/tokens/",
     "/accounts/password/"],
)  # fmt: skip
def test_pages_of_an_account_need_a_login(client, path):
    response = client.get(path)

    assert response.status_code == 302
    assert response["Location"] == f"/accounts/login/?next={path}"


# --- API tokens --------------------------------------------------------------------------------


def test_a_new_token_is_shown_once_and_only_its_hash_is_kept(client, buyer):
    login(client, buyer)

    response = client.post("/accounts/tokens/", {"name": "laptop CLI"})

    assert response.status_code == 200
    token = re.search(r'id="new-token-value"[^>]*value="(molt_[^"]+)"', text(response)).group(1)
    assert "no-store" in response["Cache-Control"]
    record = ApiToken.objects.get(user=buyer)
    assert record.name == "laptop CLI"
    assert record.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert token not in {record.hint, record.name, record.token_hash}
    later = text(client.get("/accounts/tokens/"))
    assert token not in later
    assert f"{record.hint}…" in later and "laptop CLI" in later and "never" in later
    # The token works for the API.
    api = client_class_api(token).get("/api/v1/wallet/")
    assert api.status_code == 200


def client_class_api(token: str):
    from rest_framework.test import APIClient

    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return api


def test_the_token_list_shows_last_use(client, buyer):
    token = issue_api_token(buyer, name="ci")
    client_class_api(token).get("/api/v1/wallet/")
    login(client, buyer)

    page = text(client.get("/accounts/tokens/"))

    row = re.search(r'<tr data-token-id="\d+">(.*?)</tr>', page, re.S).group(1)
    assert "ci" in row and "never" not in row


def test_revoking_a_token_stops_it_working(client, buyer):
    token = issue_api_token(buyer, name="old")
    record = ApiToken.objects.get(user=buyer)
    login(client, buyer)

    response = client.post(f"/accounts/tokens/{record.pk}/revoke/")

    assert response.status_code == 302
    assert not ApiToken.objects.filter(pk=record.pk).exists()
    assert client_class_api(token).get("/api/v1/wallet/").status_code == 401
    assert "Token revoked" in text(client.get("/accounts/tokens/"))


def test_a_stranger_cannot_revoke_someone_elses_token(client, buyer, stranger):
    issue_api_token(buyer)
    record = ApiToken.objects.get(user=buyer)
    login(client, stranger)

    assert client.post(f"/accounts/tokens/{record.pk}/revoke/").status_code == 404
    assert ApiToken.objects.filter(pk=record.pk).exists()


def test_no_tokens_says_so(client, buyer):
    login(client, buyer)
    assert 'id="no-tokens"' in text(client.get("/accounts/tokens/"))


# --- listing and quote -------------------------------------------------------------------------


def test_the_listing_page_shows_the_all_in_quote_for_the_chosen_hours_and_gpus(client, listing):
    response = client.get(f"/listings/{listing.pk}/", {"hours": "3", "gpu_count": "2"})

    assert response.status_code == 200
    q = quote_for(listing, gpu_count=2, hours=3)
    page = text(response)
    assert q.time_charge == 9_000_000
    assert 'id="quote-time">$9.00<' in page
    assert f'id="quote-allowance">${q.bandwidth_allowance_charge / 1e6:.2f}<' in page  # 50 GiB
    assert f'id="quote-fee">${q.fee / 1e6:.2f}<' in page
    assert f'id="quote-total">${q.total_hold / 1e6:.2f}<' in page
    assert "Log in to order" in page  # anonymous


def test_the_listing_page_offers_ordering_to_a_logged_in_buyer(client, buyer, listing):
    ledger.grant_credits(buyer, 25_000_000)
    add_ssh_key(buyer, public_key=ssh_public_key("alice@laptop"))  # a sandbox needs a key
    login(client, buyer)

    page = text(client.get(f"/listings/{listing.pk}/"))

    assert 'id="order-button"' in page
    assert 'data-amount="25000000"' in page
    assert "/static/frontend/js/listing.js" in page


def test_a_provider_cannot_order_their_own_listing_from_its_page(client, provider, listing):
    login(client, provider)
    page = text(client.get(f"/listings/{listing.pk}/"))
    assert "This is your own listing." in page and 'id="order-button"' not in page


def test_a_paused_listing_has_no_page(client, listing):
    listing.is_active = False
    listing.save(update_fields=["is_active"])
    assert client.get(f"/listings/{listing.pk}/").status_code == 404


def test_the_quote_api_prices_an_order_for_anyone(client, listing):
    response = client.get(f"/api/v1/listings/{listing.pk}/quote/", {"hours": 4, "gpu_count": 2})

    assert response.status_code == 200
    q = quote_for(listing, gpu_count=2, hours=4)
    assert response.json() == {
        "listing": listing.pk,
        "hours": 4,
        "gpu_count": 2,
        "gpus_available": 2,
        "time_charge": q.time_charge,
        "bandwidth_allowance_bytes": q.bandwidth_allowance_bytes,
        "bandwidth_allowance_charge": q.bandwidth_allowance_charge,
        "fee": q.fee,
        "total_hold": q.total_hold,
        "currency": "USD",
        "unit": "micro",
        # Spelled by marketplace.money, so the page's script need not format money itself.
        "display": {
            "time_charge": usd(q.time_charge),
            "bandwidth_allowance_charge": usd(q.bandwidth_allowance_charge),
            "fee": usd(q.fee),
            "total_hold": usd(q.total_hold),
        },
    }


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"hours": 0, "gpu_count": 1}, "hours"),
        ({"hours": 100_000, "gpu_count": 1}, "hours"),
        ({"hours": 1, "gpu_count": 3}, "gpu_count"),
        ({"hours": "x", "gpu_count": 1}, "hours"),
        ({"gpu_count": 1}, "hours"),
    ],
)
def test_the_quote_api_names_the_bad_input(client, listing, params, field):
    response = client.get(f"/api/v1/listings/{listing.pk}/quote/", params)

    assert response.status_code == 400
    assert field in response.json()


def test_the_quote_api_knows_only_listings_on_offer(client, listing):
    listing.is_active = False
    listing.save(update_fields=["is_active"])
    response = client.get(f"/api/v1/listings/{listing.pk}/quote/", {"hours": 1, "gpu_count": 1})
    assert response.status_code == 404


# --- orders ------------------------------------------------------------------------------------


def test_the_order_page_renders_for_its_buyer(client, buyer, running_order):
    login(client, buyer)

    response = client.get(f"/orders/{running_order.pk}/")

    page = text(response)
    assert response.status_code == 200
    assert 'data-state="running"' in page
    assert running_order.wireguard_public_key in page
    assert running_order.job_peer.address in page
    assert f'data-ws-path="/ws/orders/{running_order.pk}/"' in page
    assert "/static/frontend/vendor/qrcode-generator/qrcode.js" in page
    assert 'id="no-receipt"' in page
    assert '<li data-step="running" class=" current" aria-current="step">' in page


def test_another_buyers_order_is_a_404(client, stranger, running_order):
    login(client, stranger)

    assert client.get(f"/orders/{running_order.pk}/").status_code == 404
    assert client.get(f"/orders/{running_order.pk}/panels/").status_code == 404
    assert f"#{running_order.pk}" not in text(client.get("/orders/"))


def test_the_orders_page_lists_the_buyers_orders(client, buyer, running_order):
    login(client, buyer)
    page = text(client.get("/orders/"))
    assert f'data-order-id="{running_order.pk}"' in page
    assert "state-running" in page


def test_no_orders_says_so(client, buyer):
    login(client, buyer)
    assert 'id="no-orders"' in text(client.get("/orders/"))


def metering(identity, key, seq, at, rx, tx):
    body = wire.MeteringSample(
        node_id=identity.node_id,
        boot_id="b" * 22,
        seq=seq,
        sampled_at=at,
        peers=(wire.PeerCounters(public_key=key, epoch=1, rx_bytes=rx, tx_bytes=tx),),
    ).to_dict()
    return wire.signed_envelope(wire.METERING, body, identity)


def test_usage_is_charted_from_the_nodes_signed_metering_samples(
    client, buyer, node_identity, running_order
):
    identity, node = node_identity
    key = running_order.wireguard_public_key
    start = int(time.time())
    for seq, (rx, tx) in enumerate([(0, 0), (1000, 4000), (3000, 10_000), (3500, 30_000)]):
        ingest_metering(node, metering(identity, key, seq + 1, start + 10 * seq, rx, tx))
    login(client, buyer)

    page = text(client.get(f"/orders/{running_order.pk}/"))

    assert 'id="bytes-in">29.3 KiB<' in page  # 30,000 bytes sent by the provider
    assert 'id="bytes-out">3.4 KiB<' in page
    chart = re.search(r'<svg class="chart" id="usage-chart".*?</svg>', page, re.S).group(0)
    received = re.search(r'class="series in" fill="none" points="([^"]+)"', chart).group(1)
    points = [tuple(map(float, p.split(","))) for p in received.split()]
    assert len(points) == 3
    # Rates of 400, 600 and 2000 B/s under a 2000 B/s top line: the last point is the highest.
    assert points[2][1] == pytest.approx(0.0) and points[0][1] > points[1][1] > points[2][1]
    assert "over 3 metering intervals" in chart


def test_the_receipt_shows_the_settlement_once_completed(client, buyer, listing, running_order):
    stop_order(running_order)
    ack(listing.node)
    running_order.refresh_from_db()
    assert running_order.state == "completed"
    login(client, buyer)

    panels = text(client.get(f"/orders/{running_order.pk}/panels/"))

    settlement = running_order.settlement
    assert 'id="receipt"' in panels
    assert "Released to your wallet" in panels and "platform fee" in panels
    assert settlement.captured + settlement.released == running_order.hold_amount
    released = f"${settlement.released // 1_000_000:,}."
    assert released in re.search(r'id="receipt-released">([^<]+)<', panels).group(1)


# --- disputes ----------------------------------------------------------------------------------


@pytest.fixture
def settled_order(buyer, listing):
    """An order that ran an hour and was stopped and settled, through the real paths: charged,
    so its provider share is frozen for the dispute window."""
    ledger.grant_credits(buyer, 100_000_000)
    order = place_order(
        buyer, listing_id=listing.pk, gpu_count=1, hours=2, wireguard_public_key=wg_public_key()
    )
    provision_order(order.pk)
    ack(listing.node, at=timezone.now() - timedelta(hours=1))
    stop_order(Order.objects.get(pk=order.pk))
    ack(listing.node)
    order = Order.objects.select_related("settlement", "earnings_hold").get(pk=order.pk)
    assert order.state == "completed" and order.settlement.captured > 0
    return order


def dispute_via_page_api(client, order, reason: str, key: str | None = None):
    """What the order page's script sends: the session's JSON POST with a fresh key."""
    return client.post(
        f"/api/v1/orders/{order.pk}/dispute/",
        {"reason": reason},
        content_type="application/json",
        HTTP_IDEMPOTENCY_KEY=key or str(uuid.uuid4()),
    )


def dispute_panel(page: str) -> str:
    return re.search(r'<section class="card" id="panel-dispute".*?</section>', page, re.S).group(0)


def test_a_settled_order_offers_a_dispute_until_its_window_closes(client, buyer, settled_order):
    login(client, buyer)

    page = text(client.get(f"/orders/{settled_order.pk}/"))

    panel = dispute_panel(page)
    assert 'id="dispute-form"' in panel and "hidden" not in panel.split(">", 1)[0]
    assert '<textarea id="dispute-reason" name="reason"' in panel and 'maxlength="2000"' in panel
    ends = settled_order.earnings_hold.release_after
    assert f'id="dispute-window-ends">{ends:%Y-%m-%d %H:%M:%S} UTC<' in panel
    assert f'data-charged="{usd(settled_order.settlement.captured)}"' in panel
    assert f'data-dispute-url="/api/v1/orders/{settled_order.pk}/dispute/"' in page
    # The live panels the script fetches carry the same form.
    assert 'id="dispute-form"' in text(client.get(f"/orders/{settled_order.pk}/panels/"))


def test_a_live_order_has_no_dispute_panel_to_show(client, buyer, running_order):
    login(client, buyer)

    panel = dispute_panel(text(client.get(f"/orders/{running_order.pk}/")))

    # There (hidden) so that the panels the script fetches later can fill it in.
    assert (
        panel.startswith('<section class="card" id="panel-dispute" data-panel')
        and " hidden>" in panel
    )
    assert 'id="dispute-form"' not in panel


def test_after_the_window_the_page_offers_no_dispute_and_the_api_refuses_it(
    client, buyer, settled_order
):
    share = settled_order.earnings_hold
    # The window passes: the beat task releases the share to the provider.
    assert payments.release_due_earnings(now=share.release_after) == 1
    login(client, buyer)

    panel = dispute_panel(text(client.get(f"/orders/{settled_order.pk}/")))

    assert 'id="dispute-form"' not in panel
    assert 'id="dispute-closed"' in panel
    assert f'closed at <time datetime="{share.release_after:%Y-%m-%dT%H:%M:%S}' in panel
    response = dispute_via_page_api(client, settled_order, "too late")
    assert response.status_code == 409
    body = response.json()
    assert body["code"] == "not_disputable"
    assert body["detail"] == (
        f"the dispute window of order {settled_order.pk} closed at "
        f"{share.release_after:%Y-%m-%d %H:%M:%S} UTC"
    )
    assert not Dispute.objects.exists()


def test_a_zero_window_closes_disputes_at_settlement(client, buyer, listing, settings):
    settings.MOLT_DISPUTE_WINDOW_SECONDS = 0
    ledger.grant_credits(buyer, 100_000_000)
    order = place_order(
        buyer, listing_id=listing.pk, gpu_count=1, hours=2, wireguard_public_key=wg_public_key()
    )
    provision_order(order.pk)
    ack(listing.node, at=timezone.now() - timedelta(minutes=30))
    stop_order(Order.objects.get(pk=order.pk))
    ack(listing.node)
    login(client, buyer)

    panel = dispute_panel(text(client.get(f"/orders/{order.pk}/")))

    assert 'id="dispute-closed"' in panel and 'id="dispute-form"' not in panel
    assert dispute_via_page_api(client, order, "x").status_code == 409


def test_an_open_dispute_shows_on_the_order_page_and_the_orders_list(client, buyer, settled_order):
    login(client, buyer)
    reason = "The GPU was throttled\nfor most of the hour"

    response = dispute_via_page_api(client, settled_order, reason)

    assert response.status_code == 201, response.content
    page = text(client.get(f"/orders/{settled_order.pk}/"))
    assert 'data-state="disputed"' in page
    # Every step was reached: disputing comes after completion.
    assert '<li data-step="completed" class=" current" aria-current="step">' in page
    assert '<li data-step="running" class="done">' in page
    panel = dispute_panel(page)
    assert 'id="dispute-form"' not in panel
    assert 'id="dispute-state" data-state="open">open<' in panel
    assert "An operator is reviewing it" in panel
    assert "The GPU was throttled\nfor most of the hour</dd>" in panel
    opened = Dispute.objects.get(order=settled_order).opened_at
    assert f'id="dispute-opened">{opened:%Y-%m-%d %H:%M:%S} UTC<' in panel
    assert 'id="receipt-refunded"' not in page  # nothing refunded yet
    row = re.search(
        rf'<tr data-order-id="{settled_order.pk}">(.*?)</tr>', text(client.get("/orders/")), re.S
    ).group(1)
    assert "state-disputed" in row and 'data-dispute="open"' in row

    # A second dispute, from a second click that got a key of its own, is refused and says why.
    again = dispute_via_page_api(client, settled_order, reason)
    assert again.status_code == 409
    assert again.json()["detail"] == f"order {settled_order.pk} was already disputed"
    assert Dispute.objects.count() == 1


def test_a_double_click_with_one_key_opens_one_dispute(client, buyer, settled_order):
    login(client, buyer)

    first = dispute_via_page_api(client, settled_order, "slow", key="attempt-1")
    second = dispute_via_page_api(client, settled_order, "slow", key="attempt-1")

    assert (first.status_code, second.status_code) == (201, 201)
    assert second["Idempotent-Replayed"] == "true" and second.content == first.content
    assert Dispute.objects.count() == 1


def test_a_resolved_dispute_shows_the_refund_on_the_page_receipt_wallet_and_list(
    client, buyer, make_user, settled_order
):
    dispute = payments.open_dispute(settled_order, buyer, "never reachable")
    before = ledger.available_for(buyer)
    refund = settled_order.settlement.captured // 2
    payments.resolve_dispute(
        dispute, refund=refund, operator=make_user("olga"), note="half back: it was slow"
    )
    login(client, buyer)

    page = text(client.get(f"/orders/{settled_order.pk}/"))

    assert 'data-state="resolved"' in page
    panel = dispute_panel(page)
    assert 'id="dispute-state" data-state="refunded">resolved with a refund<' in panel
    assert f'id="dispute-refund">{usd(refund)}<' in panel
    assert 'id="dispute-note">half back: it was slow<' in panel
    assert "never reachable" in panel
    assert f'id="receipt-refunded">{usd(refund)}<' in page
    captured = settled_order.settlement.captured
    assert f'id="receipt-net-paid">{usd(captured - refund)}<' in page
    assert ledger.available_for(buyer) == before + refund
    wallet = text(client.get("/wallet/"))
    newest = re.findall(r"<tr>\s*<td><time.*?</tr>", wallet, re.S)[0]
    assert f"dispute of order {settled_order.pk}" in newest and f"+{usd(refund)}" in newest
    row = re.search(
        rf'<tr data-order-id="{settled_order.pk}">(.*?)</tr>', text(client.get("/orders/")), re.S
    ).group(1)
    assert f'data-dispute="refunded">refunded {usd(refund)}<' in row


def test_a_dispute_resolved_without_a_refund_reads_as_rejected(
    client, buyer, make_user, settled_order
):
    dispute = payments.open_dispute(settled_order, buyer, "meh")
    payments.resolve_dispute(dispute, refund=0, operator=make_user("olga"))
    login(client, buyer)

    page = text(client.get(f"/orders/{settled_order.pk}/panels/"))

    panel = dispute_panel(page)
    assert 'id="dispute-state" data-state="rejected">rejected<' in panel
    assert "The operator refunded nothing." in panel and 'id="dispute-note"' not in panel
    assert f'id="receipt-refunded">{usd(0)}<' in page
    assert 'data-dispute="rejected"' in text(client.get("/orders/"))


def test_the_order_page_of_a_settled_disputed_and_resolved_order_costs_a_bounded_number_of_queries(
    client, buyer, make_user, settled_order, django_assert_max_num_queries
):
    login(client, buyer)
    url = f"/orders/{settled_order.pk}/"
    client.get(url)  # warm the session and content-type caches
    for step in ("settled", "disputed", "resolved"):
        if step == "disputed":
            dispute = payments.open_dispute(settled_order, buyer, "slow")
        elif step == "resolved":
            payments.resolve_dispute(dispute, refund=1, operator=make_user("olga"))
        # One query more than a live order's page: the dispute, or the frozen share's window.
        # (A live order's page has one for its sandbox: the Connect panel.)
        with django_assert_max_num_queries(8):
            response = client.get(url)
        assert f'data-state="{step if step != "settled" else "completed"}"' in text(response)


def test_a_stranger_cannot_dispute_from_the_page_api(client, stranger, settled_order):
    login(client, stranger)
    assert dispute_via_page_api(client, settled_order, "x").status_code == 404
    assert EarningsHold.objects.get(order=settled_order).state == "frozen"


# --- re-key ------------------------------------------------------------------------------------


def test_rekeying_a_running_order_swaps_the_peer_key_in_a_new_revision(
    buyer, api_client_for, listing, running_order
):
    old_key = running_order.wireguard_public_key
    before = Node.objects.get(pk=listing.node_id).desired_revision
    new_key = wg_public_key()

    response = api_client_for(buyer).post(
        f"/api/v1/orders/{running_order.pk}/rekey/",
        {"wireguard_public_key": new_key},
        format="json",
    )

    assert response.status_code == 200, response.content
    assert response.json()["wireguard_public_key"] == new_key
    assert response.json()["state"] == "running"
    peer = JobPeer.objects.get(pk=running_order.job_peer_id)
    assert (peer.public_key, peer.state, peer.address) == (
        new_key,
        "desired",
        running_order.job_peer.address,
    )
    node = Node.objects.get(pk=listing.node_id)
    assert node.desired_revision == before + 1
    desired = {p.public_key for p in desired_state(node).peers}
    assert new_key in desired and old_key not in desired
    ack(node)
    assert JobPeer.objects.get(pk=peer.pk).state == "active"
    assert Order.objects.get(pk=running_order.pk).state == "running"


def test_rekeying_a_pending_order_changes_only_the_order(buyer, api_client_for, listing):
    ledger.grant_credits(buyer, 100_000_000)
    order = place_order(
        buyer, listing_id=listing.pk, gpu_count=1, hours=1, wireguard_public_key=wg_public_key()
    )
    new_key = wg_public_key()

    response = api_client_for(buyer).post(
        f"/api/v1/orders/{order.pk}/rekey/", {"wireguard_public_key": new_key}, format="json"
    )

    assert response.status_code == 200
    provision_order(order.pk)
    assert Order.objects.get(pk=order.pk).job_peer.public_key == new_key


def test_rekey_refuses_a_key_live_on_another_order(buyer, api_client_for, listing, running_order):
    other = place_order(
        buyer, listing_id=listing.pk, gpu_count=1, hours=1, wireguard_public_key=wg_public_key()
    )

    response = api_client_for(buyer).post(
        f"/api/v1/orders/{running_order.pk}/rekey/",
        {"wireguard_public_key": other.wireguard_public_key},
        format="json",
    )

    assert response.status_code == 400
    assert "already used" in response.json()["detail"]


def test_rekey_of_an_ended_order_is_refused(buyer, api_client_for, listing, running_order):
    stop_order(running_order)
    response = api_client_for(buyer).post(
        f"/api/v1/orders/{running_order.pk}/rekey/",
        {"wireguard_public_key": wg_public_key()},
        format="json",
    )
    assert response.status_code == 409
    assert "stopping" in response.json()["detail"]


def test_rekey_of_a_strangers_order_is_a_404(stranger, api_client_for, running_order):
    key = running_order.wireguard_public_key
    response = api_client_for(stranger).post(
        f"/api/v1/orders/{running_order.pk}/rekey/",
        {"wireguard_public_key": wg_public_key()},
        format="json",
    )
    assert response.status_code == 404
    assert Order.objects.get(pk=running_order.pk).wireguard_public_key == key


def test_rekey_refuses_an_invalid_key(buyer, api_client_for, running_order):
    response = api_client_for(buyer).post(
        f"/api/v1/orders/{running_order.pk}/rekey/",
        {"wireguard_public_key": "not-a-key"},
        format="json",
    )
    assert response.status_code == 400
    assert "wireguard_public_key" in response.json()


# --- wallet ------------------------------------------------------------------------------------


def test_the_wallet_shows_balances_and_history_with_balance_after(client, buyer, running_order):
    login(client, buyer)

    response = client.get("/wallet/")

    page = text(response)
    available = 100_000_000 - running_order.hold_amount
    assert f'id="wallet-available">${available // 1_000_000:,}.' in page
    assert f'id="wallet-held">${running_order.hold_amount / 1e6:,.2f}<' in page
    rows = re.findall(r"<tr>\s*<td><time.*?</tr>", page, re.S)
    assert len(rows) == 2  # the grant, then the hold (newest first)
    assert "escrow hold placed" in rows[0] and f"hold for order {running_order.pk}" in rows[0]
    assert "credits granted" in rows[1] and "+$100.00" in rows[1]
    assert f"/orders/{running_order.pk}/" in page  # the open hold links to its order


def test_the_wallet_history_is_paginated(client, buyer):
    for i in range(30):
        ledger.grant_credits(buyer, 1_000_000 + i, memo=f"grant {i}")
    login(client, buyer)

    first = text(client.get("/wallet/"))
    second = text(client.get("/wallet/", {"page": 2}))

    assert "page 1 of 2" in first and "grant 29" in first and "grant 0" not in first
    assert "grant 0" in second and "grant 29" not in second


def test_an_empty_wallet_says_so(client, buyer):
    login(client, buyer)
    page = text(client.get("/wallet/"))
    assert 'id="no-history"' in page and 'id="wallet-available">$0.00<' in page


# --- every page --------------------------------------------------------------------------------


def buyer_pages(order, listing) -> list[str]:
    return [
        "/",
        f"/listings/{listing.pk}/",
        "/orders/",
        f"/orders/{order.pk}/",
        f"/orders/{order.pk}/panels/",
        "/wallet/",
        "/accounts/tokens/",
        "/accounts/password/",
    ]


def test_no_page_loads_anything_from_elsewhere(client, buyer, listing, running_order):
    pages = [*buyer_pages(running_order, listing)]
    login(client, buyer)
    anonymous = ["/accounts/login/", "/accounts/signup/"]
    seen = 0
    for path in pages:
        html = text(client.get(path))
        references = re.findall(r'(?:src|href|action)\s*=\s*"([^"]*)"', html)
        external = [r for r in references if re.match(r"^(?:[a-z][a-z0-9+.-]*:)?//", r, re.I)]
        assert external == [], path
        seen += len(references)
    client.logout()
    for path in anonymous:
        html = text(client.get(path))
        assert not re.search(r'(?:src|href|action)\s*=\s*"(?:https?:)?//', html), path
    assert seen > 20


def test_pages_carry_a_content_security_policy(client, buyer, listing, running_order):
    login(client, buyer)
    for path in buyer_pages(running_order, listing):
        policy = client.get(path)["Content-Security-Policy"]
        assert "script-src 'self'" in policy and "connect-src 'self'" in policy, path


@pytest.mark.parametrize(
    ("page", "limit"),
    # The listing page asks whether the buyer has an SSH key, and the order page reads the
    # order's sandbox: one query each; a running order's page reads its node's outages for what
    # it has cost so far: one more.
    [
        ("listing", 6),
        ("orders", 4),
        ("order", 8),
        ("wallet", 7),
        ("tokens", 3),
        ("ssh_keys", 3),
    ],
)
def test_pages_cost_a_bounded_number_of_queries(
    client, buyer, provider, listing, page, limit, django_assert_max_num_queries
):
    # Many rows of everything: a query per row would blow these limits.
    ledger.grant_credits(buyer, 1_000_000_000)
    for _ in range(3):
        other = enrolled_node(provider, gpus=[gpu(0), gpu(1)])
        other_listing = create_listing(
            provider, node=other, gpu_count=2, price_per_gpu_hour=100, price_per_gib=1
        )
        for _ in range(2):
            order = place_order(
                buyer,
                listing_id=other_listing.pk,
                gpu_count=1,
                hours=1,
                wireguard_public_key=wg_public_key(),
            )
            provision_order(order.pk)
        ack(other)
    for i in range(5):
        issue_api_token(buyer, name=f"t{i}")
    paths = {
        "listing": f"/listings/{listing.pk}/",
        "orders": "/orders/",
        "order": f"/orders/{order.pk}/",
        "wallet": "/wallet/",
        "tokens": "/accounts/tokens/",
        "ssh_keys": "/accounts/ssh-keys/",
    }
    for i in range(5):
        add_ssh_key(buyer, public_key=ssh_public_key(f"k{i}"))
    login(client, buyer)
    client.get(paths[page])  # warm the session and content-type caches
    with django_assert_max_num_queries(limit):
        response = client.get(paths[page])
    assert response.status_code == 200


# --- the order page's websocket ----------------------------------------------------------------
# Transactional: announcements go out on commit, and the consumer reads from its own thread.


@pytest.fixture
def in_memory_layer(settings):
    # The consumer and the announcements meet in one process here: no Redis needed.
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}


def session_cookie(client, user) -> bytes:
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}".encode()


def order_socket(order_id: int, cookie: bytes | None, origin: bytes = b"http://testserver"):
    from channels.testing import WebsocketCommunicator

    from config.asgi import application

    headers = [(b"origin", origin), (b"host", b"testserver")]
    if cookie:
        headers.append((b"cookie", cookie))
    return WebsocketCommunicator(application, f"/ws/orders/{order_id}/", headers=headers)


def run(scenario) -> None:
    from asgiref.sync import async_to_sync

    async_to_sync(scenario)()


@pytest.fixture
def pending_order(buyer, listing):
    ledger.grant_credits(buyer, 100_000_000)
    return place_order(
        buyer, listing_id=listing.pk, gpu_count=1, hours=1, wireguard_public_key=wg_public_key()
    )


async def closed_with(socket) -> int | None:
    message = await socket.receive_output(timeout=5)
    assert message["type"] == "websocket.close", message
    return message.get("code")


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("in_memory_layer")
def test_the_socket_pushes_every_transition_to_the_buyer(client, buyer, listing, pending_order):
    from channels.db import database_sync_to_async

    cookie = session_cookie(client, buyer)

    async def scenario():
        socket = order_socket(pending_order.pk, cookie)
        connected, _ = await socket.connect()
        assert connected
        first = await socket.receive_json_from(timeout=5)
        assert (first["id"], first["state"]) == (pending_order.pk, "pending")
        await database_sync_to_async(provision_order)(pending_order.pk)
        second = await socket.receive_json_from(timeout=5)
        assert second["state"] == "provisioning" and second["job_address"]
        await database_sync_to_async(ack)(listing.node)
        states = {(await socket.receive_json_from(timeout=5))["state"] for _ in range(2)}
        assert states == {"running"}  # the transition, and the peer's acknowledgement
        await socket.disconnect()

    run(scenario)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("in_memory_layer")
def test_the_socket_refuses_anonymous_users_and_strangers(client, stranger, pending_order):
    stranger_cookie = session_cookie(client, stranger)

    async def scenario():
        anonymous = order_socket(pending_order.pk, None)
        assert (await anonymous.connect())[0]
        assert await closed_with(anonymous) == 4401
        other = order_socket(pending_order.pk, stranger_cookie)
        assert (await other.connect())[0]
        assert await closed_with(other) == 4404
        missing = order_socket(pending_order.pk + 1000, stranger_cookie)
        assert (await missing.connect())[0]
        assert await closed_with(missing) == 4404

    run(scenario)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("in_memory_layer")
def test_the_socket_refuses_pages_of_other_sites(client, buyer, pending_order):
    cookie = session_cookie(client, buyer)

    async def scenario():
        socket = order_socket(pending_order.pk, cookie, origin=b"https://evil.example")
        connected, _ = await socket.connect()
        assert not connected

    run(scenario)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("in_memory_layer")
def test_the_socket_rechecks_the_session_on_every_event(client, buyer, pending_order):
    from channels.db import database_sync_to_async

    cookie = session_cookie(client, buyer)

    async def scenario():
        socket = order_socket(pending_order.pk, cookie)
        assert (await socket.connect())[0]
        assert (await socket.receive_json_from(timeout=5))["state"] == "pending"
        # The buyer logs out elsewhere; the next change must not reach this socket.
        await database_sync_to_async(client.logout)()
        await database_sync_to_async(stop_order)(pending_order)
        assert await closed_with(socket) == 4401

    run(scenario)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("in_memory_layer")
def test_the_socket_pushes_a_dispute_and_its_resolution(client, buyer, make_user, settled_order):
    from channels.db import database_sync_to_async

    cookie = session_cookie(client, buyer)
    operator = make_user("olga")

    async def scenario():
        socket = order_socket(settled_order.pk, cookie)
        assert (await socket.connect())[0]
        assert (await socket.receive_json_from(timeout=5))["state"] == "completed"
        dispute = await database_sync_to_async(payments.open_dispute)(settled_order, buyer, "slow")
        assert (await socket.receive_json_from(timeout=5))["state"] == "disputed"
        await database_sync_to_async(payments.resolve_dispute)(dispute, refund=5, operator=operator)
        assert (await socket.receive_json_from(timeout=5))["state"] == "resolved"
        await socket.disconnect()

    run(scenario)
