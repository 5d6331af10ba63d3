"""No text a person reads shows the ledger's storage unit (issue 12 item 2).

Amounts are integers of micro-USD in the database and the API; pages, admin pages, messages and
the error bodies of money errors spell them in dollars (marketplace.money). This renders the
main pages of a market where money has moved every way it can (held, settled, disputed and
refunded, frozen, released, paid out) as a visitor, a buyer, a provider and an operator, the
admin's pages of the money models, and the bodies of the money errors, and greps them all for
"micro". A leak anywhere fails it, naming the page and the line."""

from __future__ import annotations

import re
import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from marketplace import ledger, payments
from marketplace.listings import create_listing
from marketplace.models import Order
from marketplace.orders import place_order, provision_order, stop_order
from meshnet.agent_channel import acknowledge_revision
from tests import factories

pytestmark = [pytest.mark.db, pytest.mark.django_db]

MICRO = re.compile(r"micro", re.IGNORECASE)


def leaks(body: str) -> list[str]:
    """The lines of `body` that say "micro"."""
    return [line.strip()[:200] for line in body.splitlines() if MICRO.search(line)]


def ack(node, at=None) -> None:
    node.refresh_from_db()
    acknowledge_revision(node, node.desired_revision, at=at)


def order_for(buyer, listing, node, *, minutes: int | None) -> Order:
    """An order through the real paths: running for `minutes`, then stopped and settled (or
    left running with None)."""
    order = place_order(
        buyer,
        listing_id=listing.pk,
        gpu_count=1,
        hours=3,
        wireguard_public_key=factories.wg_public_key(),
    )
    provision_order(order.pk)
    ack(node, at=timezone.now() - timedelta(minutes=minutes or 30))
    order = Order.objects.get(pk=order.pk)
    Order.objects.filter(pk=order.pk).update(bytes_in=108_123_956, bytes_out=3_456_789)
    if minutes is not None:
        stop_order(order)
        ack(node)
    return Order.objects.get(pk=order.pk)


@pytest.fixture
def market(funded_buyer, provider, node, make_user):
    """Every kind of money movement, with odd amounts (a price of $0.0125 per GiB)."""
    listing = create_listing(
        provider, node=node, gpu_count=4, price_per_gpu_hour=2_495_000, price_per_gib=12_500
    )
    operator = make_user("olga", is_staff=True, is_superuser=True)
    refunded = order_for(funded_buyer, listing, node, minutes=90)
    disputed = order_for(funded_buyer, listing, node, minutes=45)
    released = order_for(funded_buyer, listing, node, minutes=20)
    running = order_for(funded_buyer, listing, node, minutes=None)
    cancelled = place_order(
        funded_buyer,
        listing_id=listing.pk,
        gpu_count=1,
        hours=1,
        wireguard_public_key=factories.wg_public_key(),
    )
    stop_order(cancelled)
    payments.open_dispute(refunded, funded_buyer, "slow")
    payments.resolve_dispute(refunded.dispute, refund=5_000, operator=operator, note="sorry")
    payments.open_dispute(disputed, funded_buyer, "throttled")
    payments.release_due_earnings(now=timezone.now() + timedelta(days=30))
    payout = payments.request_payout(provider, ledger.earnings_for(provider) // 3)
    payments.request_payout(provider, 1_234_567)
    payments.mark_payout_paid(payout, operator=operator, reference="bank 42")
    return {
        "listing": listing,
        "operator": operator,
        "orders": [refunded, disputed, released, running, cancelled],
    }


def get_all(client, paths) -> dict[str, str]:
    bodies = {}
    for path in paths:
        response = client.get(path)
        assert response.status_code == 200, (path, response.status_code)
        bodies[path] = response.content.decode()
    return bodies


def assert_no_leak(bodies: dict[str, str]) -> None:
    found = {path: lines for path, body in bodies.items() if (lines := leaks(body))}
    assert not found, found


# A stored amount or byte count printed as it is kept: a bare number of five digits or more in
# the text a person reads (markup, scripts and styles taken out; "$1,371.36" and "103.1 MiB"
# are not bare). Five digits: the smallest raw amount that reads as a price ($0.01 is 10000).
# A run of digits inside a word is not a number: a WireGuard key in base64 ("...YK68085n83s...")
# holds one by chance, so letters and base64's "+/=" on either side rule it out.
BARE_NUMBER = re.compile(r"(?<![\w$.,+/=])\d{5,}(?![\w.,+/=])")


def bare_numbers(body: str) -> list[str]:
    """The visible lines of `body` with a bare number of five digits or more."""
    body = re.sub(r"<(script|style)\b.*?</\1>", "", body, flags=re.S | re.I)
    text = re.sub(r"<[^>]+>", " ", body)
    return [line.strip()[:200] for line in text.splitlines() if BARE_NUMBER.search(line)]


def test_the_grep_finds_a_leak():
    assert leaks("ok\n<td>5000 micro-USD</td>\n") == ["<td>5000 micro-USD</td>"]
    assert leaks("Amounts are kept as MICRO dollars") != []
    assert leaks("$0.005 per GiB") == []
    assert bare_numbers("<h1>hold of order 1: 8110000 (open)</h1>") == [
        "hold of order 1: 8110000 (open)"
    ]
    assert bare_numbers('<td data-x="8110000">$8.11</td><td>103.1 MiB</td><td>$1,371.36</td>') == []
    # CI drew this key: five digits in a row inside base64 are part of the key, not an amount.
    assert bare_numbers("<td>P0yTg+x2Zv/mqloxOtsXCOYK68085n83s/G2nLcLxm4=</td>") == []
    assert bare_numbers("<td>12345/x</td><td>a+123456</td>") == []
    assert bare_numbers("<td>order 5: 108123956 bytes</td>") == ["order 5: 108123956 bytes"]


def test_a_visitor_reads_no_storage_unit(client, market):
    listing = market["listing"]
    assert_no_leak(
        get_all(client, ["/", f"/listings/{listing.pk}/", "/accounts/signup/", "/accounts/login/"])
    )


def test_a_buyer_reads_no_storage_unit(client, funded_buyer, market):
    client.force_login(funded_buyer)
    paths = ["/", f"/listings/{market['listing'].pk}/", "/orders/", "/wallet/"]
    for order in market["orders"]:
        paths += [f"/orders/{order.pk}/", f"/orders/{order.pk}/panels/"]
    bodies = get_all(client, paths)
    assert "$0.0125" in bodies[f"/listings/{market['listing'].pk}/"]
    # The part of a hold a settlement gives back is named for what it is (issue 12 item 2: it
    # read "escrow captured (settlement) +$1.33").
    wallet = bodies["/wallet/"]
    assert "unused hold returned (settlement)" in wallet and "escrow captured" not in wallet
    assert_no_leak(bodies)


def test_a_provider_reads_no_storage_unit(client, provider, node, market):
    client.force_login(provider)
    listing = market["listing"]
    bodies = get_all(
        client,
        [
            "/provider/nodes/",
            f"/provider/nodes/{node.pk}/",
            "/provider/listings/",
            f"/provider/listings/{listing.pk}/",
            "/provider/earnings/",
        ],
    )
    assert_no_leak(bodies)


MONEY_MODELS = (
    "marketplace/account",
    "marketplace/ledgertransaction",
    "marketplace/ledgerentry",
    "marketplace/escrowhold",
    "marketplace/earningshold",
    "marketplace/settlement",
    "marketplace/dispute",
    "marketplace/payoutrequest",
    "marketplace/order",
    "marketplace/ordertransition",
    "marketplace/listing",
    "marketplace/idempotencyrecord",
    "meshnet/jobpeer",
    "meshnet/jobpeerkey",
    "auth/user",
)


def test_an_operator_reads_no_storage_unit_on_the_dashboard_or_in_the_admin(client, market):
    factories.staff_login(client, market["operator"])
    from django.apps import apps

    paths = ["/", "/ops/", "/admin/"]
    for name in MONEY_MODELS:
        paths.append(f"/admin/{name}/")
        model = apps.get_model(*name.split("/"))
        # Every object's own page too: its fields are where a raw integer shows.
        for pk in model.objects.values_list("pk", flat=True)[:6]:
            paths.append(f"/admin/{name}/{pk}/change/")
    bodies = get_all(client, paths)
    # The refund of 5,000 micro-USD reads as money in the order's history.
    assert any("$0.005 refunded" in body for body in bodies.values())
    assert "108123956" not in bodies["/admin/marketplace/order/"]
    assert "103.1 MiB" in bodies["/admin/marketplace/order/"]
    assert_no_leak(bodies)
    # Readable amounts and byte counts in the admin: no stored integer shows bare, in the lists,
    # the change pages, or their titles and breadcrumbs (the objects' names). The user pages are
    # left out: Django shows the password hasher's iteration count there. (The dashboard's
    # address pools are counts of addresses, not amounts.)
    bare = {
        path: lines
        for path, body in bodies.items()
        if path.startswith("/admin/")
        and not path.startswith("/admin/auth/user/")
        and (lines := bare_numbers(body))
    }
    assert not bare, bare


def test_the_money_errors_a_person_meets_say_dollars(api_client_for, client, make_user, market):
    """Insufficient funds to order, to pay out; a refund beyond the charge; bad amounts."""
    broke = make_user("broke")
    provider = market["listing"].owner
    bodies = {}

    order = api_client_for(broke).post(
        "/api/v1/orders/",
        {
            "listing": market["listing"].pk,
            "gpu_count": 1,
            "hours": 1,
            "wireguard_public_key": factories.wg_public_key(),
        },
        format="json",
    )
    assert order.status_code == 402, order.content
    bodies["order without funds"] = order.content.decode()
    assert "$" in bodies["order without funds"]

    payout = api_client_for(provider).post("/api/v1/payouts/", {"amount": 10**11}, format="json")
    assert payout.status_code in (400, 402), payout.content
    bodies["payout beyond earnings"] = payout.content.decode()

    fraction = api_client_for(provider).post(
        "/api/v1/payouts/", b'{"amount": 1.5}', content_type="application/json"
    )
    assert fraction.status_code == 400
    bodies["a fractional amount"] = fraction.content.decode()

    price = api_client_for(provider).patch(
        f"/api/v1/listings/{market['listing'].pk}/", {"price_per_gib": 10**14}, format="json"
    )
    assert price.status_code == 400
    bodies["a price too high"] = price.content.decode()

    client.force_login(provider)
    page = client.post(
        "/provider/earnings/payout/", {"amount": "900000", "nonce": uuid.uuid4().hex}
    )
    assert page.status_code == 200
    bodies["payout form beyond earnings"] = page.content.decode()
    assert "cannot cover $" in bodies["payout form beyond earnings"]

    factories.staff_login(client, market["operator"])
    dispute = market["orders"][1].dispute
    form = client.post(
        "/admin/marketplace/dispute/", {"action": "resolve", "_selected_action": [dispute.pk]}
    ).content.decode()
    refund_input = re.search(r'<input[^>]*name="refund"[^>]*>', form).group(0)
    assert "value=" not in refund_input  # no pre-filled 0 beside the field
    bodies["the resolve form"] = form
    refund = client.post(
        "/admin/marketplace/dispute/",
        {
            "action": "resolve",
            "_selected_action": [dispute.pk],
            "apply": "1",
            "refund": "999999",
            "note": "",
        },
    )
    assert refund.status_code == 200
    bodies["refund beyond the charge"] = refund.content.decode()
    assert "is more than the $" in bodies["refund beyond the charge"]

    assert_no_leak(bodies)
