"""The wallet API: what the caller may spend and what is held in escrow, in integer micro-USD,
and never anybody else's money."""

from __future__ import annotations

import pytest

from marketplace import ledger
from marketplace.orders import place_order, stop_order
from tests import factories
from tests.factories import USD

pytestmark = [pytest.mark.db, pytest.mark.django_db]

WALLET = "/api/v1/wallet/"


def test_a_new_user_has_an_empty_wallet(api_client_for, buyer):
    response = api_client_for(buyer).get(WALLET)

    assert response.status_code == 200
    assert response.json() == {
        "available": 0,
        "held": 0,
        "earnings": 0,
        "earnings_frozen": 0,
        "payouts_pending": 0,
        "currency": "USD",
        "unit": "micro",
    }


def test_an_order_moves_its_hold_from_available_to_held(api_client_for, buyer, listing):
    ledger.grant_credits(buyer, 100 * USD)
    order = place_order(
        buyer,
        listing_id=listing.pk,
        gpu_count=1,
        hours=3,
        wireguard_public_key=factories.wg_public_key(),
    )

    body = api_client_for(buyer).get(WALLET).json()

    assert body["held"] == order.hold_amount == 3 * 2 * USD + 50 * 10_000
    assert body["available"] == 100 * USD - order.hold_amount
    assert all(isinstance(body[k], int) for k in ("available", "held"))

    stop_order(order)
    assert api_client_for(buyer).get(WALLET).json()["held"] == 0
    assert api_client_for(buyer).get(WALLET).json()["available"] == 100 * USD


def test_each_user_sees_only_their_own_money(api_client_for, buyer, stranger, listing):
    ledger.grant_credits(buyer, 100 * USD)
    place_order(
        buyer,
        listing_id=listing.pk,
        gpu_count=1,
        hours=1,
        wireguard_public_key=factories.wg_public_key(),
    )
    ledger.grant_credits(stranger, 7 * USD)

    theirs = api_client_for(stranger).get(WALLET).json()

    assert (theirs["available"], theirs["held"]) == (7 * USD, 0)
