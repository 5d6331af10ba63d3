"""Money after settlement: the provider's share frozen for the dispute window, disputes and
their resolution, payout requests, operator top-ups, and the itemised receipt. Every path moves
money by balanced ledger transactions, exactly once, and the audit stays clean."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from marketplace import ledger, payments
from marketplace.audit import audit_ledger
from marketplace.errors import AlreadyResolved, InsufficientFunds, MarketError
from marketplace.models import (
    Account,
    Dispute,
    EarningsHold,
    IdempotencyRecord,
    LedgerTransaction,
    Order,
    OrderTransition,
    PayoutRequest,
    Settlement,
)
from marketplace.orders import provision_order, stop_order
from marketplace.settlement import settle_order
from tests import factories
from tests.db.settled_orders import (
    ack,
    balances,
    placed_order,
    settled_order,
)
from tests.factories import USD

pytestmark = [pytest.mark.db, pytest.mark.django_db]

PRICE = 2 * USD


# --- the frozen share ------------------------------------------------------------------------


def test_settlement_freezes_the_provider_share_until_the_window_passes(
    funded_buyer, provider, listing, node, settings
):
    order = settled_order(funded_buyer, listing, node)
    settlement, share = order.settlement, order.earnings_hold
    assert share.amount == settlement.provider_amount > 0
    assert share.state == EarningsHold.State.FROZEN
    window = timedelta(seconds=settings.MOLT_DISPUTE_WINDOW_SECONDS)
    assert share.release_after - settlement.created_at == pytest.approx(
        window, abs=timedelta(seconds=1)
    )
    assert ledger.frozen_for(provider) == share.amount
    assert ledger.earnings_for(provider) == 0
    assert audit_ledger() == []

    assert payments.release_due_earnings(now=share.release_after - timedelta(seconds=1)) == 0
    assert ledger.earnings_for(provider) == 0

    assert payments.release_due_earnings(now=share.release_after) == 1
    share.refresh_from_db()
    assert share.state == EarningsHold.State.RELEASED
    assert share.resolution.kind == LedgerTransaction.Kind.EARNED
    assert share.resolution.once_key == f"earnings:{share.pk}"
    assert ledger.earnings_for(provider) == settlement.provider_amount
    assert ledger.frozen_for(provider) == 0
    # A second run (the beat fires again) releases nothing more.
    assert payments.release_due_earnings(now=share.release_after + timedelta(days=1)) == 0
    assert ledger.earnings_for(provider) == settlement.provider_amount
    assert audit_ledger() == []


def test_a_second_resolution_of_a_share_is_refused_by_its_once_key(
    funded_buyer, provider, listing, node
):
    order = settled_order(funded_buyer, listing, node)
    share = order.earnings_hold
    payments.release_due_earnings(now=share.release_after)
    before = balances()
    # Past every state check: the unique once_key is the guarantee underneath.
    with pytest.raises(AlreadyResolved):
        ledger.post(
            LedgerTransaction.Kind.EARNED,
            [(ledger.fees_account(), -1), (ledger.earnings_account(provider), 1)],
            once_key=f"earnings:{share.pk}",
        )
    assert balances() == before


def test_an_order_that_charged_nothing_freezes_nothing(funded_buyer, listing):
    order = placed_order(funded_buyer, listing)
    stop_order(order)
    assert not EarningsHold.objects.exists()
    assert not Account.objects.filter(kind=Account.Kind.FROZEN).exists()


# --- disputes --------------------------------------------------------------------------------


def dispute_url(order) -> str:
    return f"/api/v1/orders/{order.pk}/dispute/"


def test_a_dispute_freezes_the_share_until_an_operator_refunds_part_of_it(
    api_client_for, funded_buyer, provider, listing, node, make_user
):
    order = settled_order(funded_buyer, listing, node)
    s = order.settlement
    wallet_before = ledger.available_for(funded_buyer)

    response = api_client_for(funded_buyer).post(
        dispute_url(order), {"reason": "the GPU was throttled"}, format="json"
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["state"] == "open" and body["reason"] == "the GPU was throttled"
    assert body["refund"] is None
    order.refresh_from_db()
    assert order.state == "disputed"
    share = EarningsHold.objects.get(order=order)
    assert share.state == EarningsHold.State.DISPUTED
    assert audit_ledger() == []

    # The window passing does not release a disputed share.
    assert payments.release_due_earnings(now=share.release_after + timedelta(days=30)) == 0
    assert ledger.frozen_for(provider) == s.provider_amount

    operator = make_user("olga", is_staff=True)
    refund = s.provider_amount // 4
    dispute = payments.resolve_dispute(
        Dispute.objects.get(order=order), refund=refund, operator=operator, note="partial"
    )
    assert dispute.state == "resolved" and dispute.refund == refund
    assert dispute.resolution.kind == LedgerTransaction.Kind.DISPUTE
    assert ledger.available_for(funded_buyer) == wallet_before + refund
    assert ledger.earnings_for(provider) == s.provider_amount - refund
    assert ledger.frozen_for(provider) == 0
    assert ledger.fees_account().balance == s.fee  # the fee is untouched by a partial refund
    order.refresh_from_db()
    assert order.state == "resolved"
    assert list(OrderTransition.objects.filter(order=order).values_list("from_state", "to_state"))[
        -2:
    ] == [("completed", "disputed"), ("disputed", "resolved")]
    assert audit_ledger() == []

    # The buyer sees the outcome on the order.
    shown = api_client_for(funded_buyer).get(f"/api/v1/orders/{order.pk}/").json()
    assert shown["state"] == "resolved"
    assert shown["dispute"]["refund"] == refund
    assert shown["dispute"]["resolution_note"] == "partial"

    before = balances()
    with pytest.raises(AlreadyResolved):
        payments.resolve_dispute(dispute, refund=0, operator=operator)
    assert balances() == before


def test_a_full_refund_comes_out_of_the_share_and_then_the_platform_fee(
    funded_buyer, provider, listing, node, make_user
):
    order = settled_order(funded_buyer, listing, node)
    s = order.settlement
    paid = ledger.available_for(funded_buyer)
    dispute = payments.open_dispute(order, funded_buyer, "never worked")
    operator = make_user("olga", is_staff=True)

    with pytest.raises(MarketError, match="more than"):
        payments.resolve_dispute(dispute, refund=s.captured + 1, operator=operator)
    assert Dispute.objects.get(pk=dispute.pk).state == "open"

    payments.resolve_dispute(dispute, refund=s.captured, operator=operator)
    assert ledger.available_for(funded_buyer) == paid + s.captured
    assert ledger.earnings_for(provider) == 0
    assert ledger.fees_account().balance == 0  # the fee went back too
    assert audit_ledger() == []


@pytest.mark.parametrize("when", ["live", "cancelled", "window_closed", "twice"])
def test_a_dispute_that_is_not_allowed_is_a_409_and_moves_nothing(
    api_client_for, funded_buyer, listing, node, when
):
    client = api_client_for(funded_buyer)
    if when == "live":
        order = placed_order(funded_buyer, listing)
    elif when == "cancelled":
        order = placed_order(funded_buyer, listing)
        stop_order(order)
    else:
        order = settled_order(funded_buyer, listing, node)
        if when == "window_closed":
            EarningsHold.objects.filter(order=order).update(
                release_after=timezone.now() - timedelta(seconds=1)
            )
        else:
            assert (
                client.post(dispute_url(order), {"reason": "x"}, format="json").status_code == 201
            )
    before = (balances(), Dispute.objects.count(), Order.objects.get(pk=order.pk).state)

    response = client.post(dispute_url(order), {"reason": "bad"}, format="json")

    assert response.status_code == 409, response.content
    assert response.json()["code"] == "not_disputable"
    assert (balances(), Dispute.objects.count(), Order.objects.get(pk=order.pk).state) == before


def test_a_dispute_needs_a_reason(api_client_for, funded_buyer, listing, node):
    order = settled_order(funded_buyer, listing, node)
    response = api_client_for(funded_buyer).post(dispute_url(order), {"reason": ""}, format="json")
    assert response.status_code == 400
    assert "reason" in response.json()
    assert not Dispute.objects.exists()


def test_a_stranger_cannot_dispute_someone_elses_order(
    api_client_for, funded_buyer, stranger, listing, node
):
    order = settled_order(funded_buyer, listing, node)
    response = api_client_for(stranger).post(dispute_url(order), {"reason": "x"}, format="json")
    assert response.status_code == 404
    assert not Dispute.objects.exists()


def test_a_retried_dispute_replays_the_first_answer(api_client_for, funded_buyer, listing, node):
    order = settled_order(funded_buyer, listing, node)
    client = api_client_for(funded_buyer)
    first = client.post(
        dispute_url(order), {"reason": "slow"}, format="json", HTTP_IDEMPOTENCY_KEY="d1"
    )
    again = client.post(
        dispute_url(order), {"reason": "slow"}, format="json", HTTP_IDEMPOTENCY_KEY="d1"
    )
    other = client.post(
        dispute_url(order), {"reason": "other"}, format="json", HTTP_IDEMPOTENCY_KEY="d1"
    )
    assert (first.status_code, again.status_code, other.status_code) == (201, 201, 422)
    assert again.content == first.content and again["Idempotent-Replayed"] == "true"
    assert Dispute.objects.count() == 1


# --- payouts ---------------------------------------------------------------------------------


def test_a_payout_request_sets_earnings_aside_and_an_operator_pays_it_once(
    api_client_for, earning_provider, make_user
):
    provider = earning_provider
    earned = ledger.earnings_for(provider)
    client = api_client_for(provider)
    world = ledger.world_account().balance

    response = client.post("/api/v1/payouts/", {"amount": earned - 1000}, format="json")
    assert response.status_code == 201, response.content
    payout = PayoutRequest.objects.get(pk=response.json()["id"])
    assert response.json()["state"] == "requested"
    wallet = client.get("/api/v1/wallet/").json()
    assert (wallet["earnings"], wallet["payouts_pending"]) == (1000, earned - 1000)
    assert audit_ledger() == []

    operator = make_user("olga", is_staff=True)
    payments.mark_payout_paid(payout, operator=operator, reference="SEPA 42")
    payout.refresh_from_db()
    assert payout.state == "paid" and payout.note == "SEPA 42" and payout.decided_by == operator
    assert payout.resolution.kind == LedgerTransaction.Kind.PAYOUT
    assert ledger.world_account().balance == world + earned - 1000
    assert ledger.payouts_pending_for(provider) == 0
    assert ledger.earnings_for(provider) == 1000
    assert audit_ledger() == []

    before = balances()
    with pytest.raises(AlreadyResolved):
        payments.mark_payout_paid(payout, operator=operator)
    with pytest.raises(AlreadyResolved):
        payments.reject_payout(payout, operator=operator, reason="too late")
    assert balances() == before
    assert client.get("/api/v1/payouts/").json()["results"][0]["state"] == "paid"


def test_a_rejected_payout_goes_back_to_earnings(earning_provider, make_user):
    provider = earning_provider
    earned = ledger.earnings_for(provider)
    payout = payments.request_payout(provider, earned)
    assert ledger.earnings_for(provider) == 0
    with pytest.raises(MarketError, match="why"):
        payments.reject_payout(payout, operator=make_user("olga"), reason=" ")
    payments.reject_payout(payout, operator=make_user("oscar"), reason="bank details missing")
    assert ledger.earnings_for(provider) == earned
    assert PayoutRequest.objects.get(pk=payout.pk).state == "rejected"
    assert audit_ledger() == []


def test_a_payout_beyond_earnings_is_a_402_and_frozen_shares_do_not_count(
    api_client_for, funded_buyer, provider, listing, node
):
    order = settled_order(funded_buyer, listing, node)  # its share is still frozen
    assert ledger.frozen_for(provider) > 0
    before = (balances(), PayoutRequest.objects.count(), LedgerTransaction.objects.count())

    response = api_client_for(provider).post("/api/v1/payouts/", {"amount": 1}, format="json")

    assert response.status_code == 402
    assert response.json()["code"] == "insufficient_funds"
    assert (balances(), PayoutRequest.objects.count(), LedgerTransaction.objects.count()) == before
    assert order.earnings_hold.state == "frozen"


@pytest.mark.parametrize("amount", [0, -5, "1.5", "ten"])
def test_a_bad_payout_amount_is_a_400(api_client_for, provider, amount):
    response = api_client_for(provider).post("/api/v1/payouts/", {"amount": amount}, format="json")
    assert response.status_code == 400
    assert "amount" in response.json()


def test_payout_requests_are_private_and_retries_replay(api_client_for, earning_provider, stranger):
    client = api_client_for(earning_provider)
    first = client.post(
        "/api/v1/payouts/", {"amount": 500}, format="json", HTTP_IDEMPOTENCY_KEY="p"
    )
    again = client.post(
        "/api/v1/payouts/", {"amount": 500}, format="json", HTTP_IDEMPOTENCY_KEY="p"
    )
    assert again.content == first.content and again["Idempotent-Replayed"] == "true"
    assert PayoutRequest.objects.count() == 1
    payout_id = first.json()["id"]
    other = api_client_for(stranger)
    assert other.get(f"/api/v1/payouts/{payout_id}/").status_code == 404
    assert other.get("/api/v1/payouts/").json()["results"] == []


def test_a_payout_amount_is_checked_by_the_service_too(provider):
    with pytest.raises(MarketError):
        payments.request_payout(provider, 0)
    with pytest.raises(InsufficientFunds):
        payments.request_payout(provider, 1)
    assert not PayoutRequest.objects.exists()


# --- top-ups -----------------------------------------------------------------------------------

TOP_UPS = "/api/v1/wallet/top-ups/"


def test_an_operator_tops_up_another_users_wallet(api_client_for, make_user, buyer):
    operator = make_user("olga", is_staff=True)
    response = api_client_for(operator).post(
        TOP_UPS, {"amount": 5 * USD, "user": "alice"}, format="json"
    )
    assert response.status_code == 201, response.content
    assert response.json()["user"] == "alice"
    assert response.json()["available"] == 5 * USD == ledger.available_for(buyer)
    txn = LedgerTransaction.objects.get(pk=response.json()["transaction"])
    assert txn.kind == "grant" and "olga" in txn.memo
    assert audit_ledger() == []


def test_self_top_ups_are_off_in_production(api_client_for, buyer, settings):
    settings.MOLT_ALLOW_SELF_TOP_UP = False
    response = api_client_for(buyer).post(TOP_UPS, {"amount": USD}, format="json")
    assert response.status_code == 403
    assert ledger.available_for(buyer) == 0
    assert not IdempotencyRecord.objects.exists()


def test_where_enabled_users_top_up_only_their_own_wallet(
    api_client_for, buyer, stranger, settings
):
    settings.MOLT_ALLOW_SELF_TOP_UP = True
    client = api_client_for(buyer)
    assert client.post(TOP_UPS, {"amount": USD}, format="json").status_code == 201
    refused = client.post(TOP_UPS, {"amount": USD, "user": "mallory"}, format="json")
    assert refused.status_code == 403
    assert (ledger.available_for(buyer), ledger.available_for(stranger)) == (USD, 0)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"amount": 0}, "amount"),
        ({"amount": 10**13}, "amount"),
        ({"amount": 5, "user": "nobody"}, "user"),
    ],
)
def test_a_bad_top_up_names_the_field(api_client_for, make_user, body, field):
    response = api_client_for(make_user("olga", is_staff=True)).post(TOP_UPS, body, format="json")
    assert response.status_code == 400
    assert field in response.json()
    assert not LedgerTransaction.objects.exists()


def test_a_retried_top_up_credits_once(api_client_for, make_user, buyer):
    client = api_client_for(make_user("olga", is_staff=True))
    body = {"amount": 3 * USD, "user": "alice"}
    first = client.post(TOP_UPS, body, format="json", HTTP_IDEMPOTENCY_KEY="t")
    again = client.post(TOP_UPS, body, format="json", HTTP_IDEMPOTENCY_KEY="t")
    assert again.content == first.content
    assert ledger.available_for(buyer) == 3 * USD


# --- receipts --------------------------------------------------------------------------------


def test_the_receipt_itemises_the_capture_and_its_lines_sum_to_it(
    api_client_for, funded_buyer, listing, node, settings
):
    order = settled_order(funded_buyer, listing, node, minutes=45)
    s = order.settlement

    receipt = api_client_for(funded_buyer).get(f"/api/v1/orders/{order.pk}/receipt/").json()

    assert receipt["captured"] == s.captured == sum(line["amount"] for line in receipt["lines"])
    assert receipt["captured"] + receipt["released"] == receipt["hold"] == order.hold_amount
    assert receipt["platform_fee"] + receipt["provider_share"] == receipt["captured"]
    assert receipt["platform_fee"] == s.captured * settings.MOLT_PLATFORM_FEE_BPS // 10_000
    time_line = receipt["lines"][0]
    assert time_line["kind"] == "time"
    assert (time_line["seconds"], time_line["gpu_count"]) == (s.billed_seconds, 1)
    assert time_line["amount"] == PRICE * s.billed_seconds // 3600
    assert [line["kind"] for line in receipt["lines"]] == ["time", "bandwidth"]
    assert receipt["refunded"] == 0 and receipt["net_paid"] == s.captured


def test_a_receipt_of_a_bandwidth_heavy_order_shows_bytes_and_the_hold_cap(
    api_client_for, funded_buyer, listing, node
):
    order = placed_order(funded_buyer, listing)
    provision_order(order.pk)
    ack(node, at=timezone.now() - timedelta(minutes=59, seconds=59))
    # Far past the allowance (arrived after the stop, so the job could not be stopped in time).
    Order.objects.filter(pk=order.pk).update(bytes_in=500 << 30, bytes_out=100 << 30)
    stop_order(Order.objects.get(pk=order.pk))
    ack(node)

    receipt = api_client_for(funded_buyer).get(f"/api/v1/orders/{order.pk}/receipt/").json()

    kinds = [line["kind"] for line in receipt["lines"]]
    assert kinds == ["time", "bandwidth", "hold_cap"]
    bandwidth = receipt["lines"][1]
    assert bandwidth["bytes"] == 600 << 30 and bandwidth["amount"] == 600 * 10_000
    assert receipt["lines"][2]["amount"] < 0
    assert (
        receipt["captured"] == order.hold_amount == sum(line["amount"] for line in receipt["lines"])
    )
    assert receipt["released"] == 0


def test_a_cancelled_orders_receipt_released_everything(api_client_for, funded_buyer, listing):
    order = placed_order(funded_buyer, listing)
    client = api_client_for(funded_buyer)
    assert client.get(f"/api/v1/orders/{order.pk}/receipt/").status_code == 409  # still live
    stop_order(order)
    receipt = client.get(f"/api/v1/orders/{order.pk}/receipt/").json()
    assert (receipt["captured"], receipt["lines"], receipt["released"]) == (
        0,
        [],
        order.hold_amount,
    )


def test_a_receipt_shows_a_dispute_refund(
    api_client_for, funded_buyer, stranger, listing, node, make_user
):
    order = settled_order(funded_buyer, listing, node)
    dispute = payments.open_dispute(order, funded_buyer, "slow")
    payments.resolve_dispute(dispute, refund=1234, operator=make_user("olga"))
    url = f"/api/v1/orders/{order.pk}/receipt/"
    receipt = api_client_for(funded_buyer).get(url).json()
    assert receipt["refunded"] == 1234
    assert receipt["net_paid"] == receipt["captured"] - 1234
    assert api_client_for(stranger).get(url).status_code == 404


# --- the admin ---------------------------------------------------------------------------------


@pytest.fixture
def admin_client(client, make_user):
    operator = make_user("olga", is_staff=True, is_superuser=True)
    factories.staff_login(client, operator)
    return client


def test_an_operator_resolves_a_dispute_in_the_admin_with_a_refund_form(
    admin_client, funded_buyer, provider, listing, node
):
    order = settled_order(funded_buyer, listing, node)
    dispute = payments.open_dispute(order, funded_buyer, "throttled")
    url = "/admin/marketplace/dispute/"
    listing_page = admin_client.get(url)
    assert listing_page.status_code == 200 and b"alice" in listing_page.content

    page = admin_client.post(url, {"action": "resolve", "_selected_action": [dispute.pk]})
    assert page.status_code == 200
    assert b"Refund to the buyer" in page.content

    wallet = ledger.available_for(funded_buyer)
    done = admin_client.post(
        url,
        {
            "action": "resolve",
            "_selected_action": [dispute.pk],
            "apply": "1",
            "refund": "0.5",
            "note": "half a dollar back",
        },
    )
    assert done.status_code == 302
    dispute.refresh_from_db()
    assert (dispute.state, dispute.refund, dispute.resolution_note) == (
        "resolved",
        500_000,
        "half a dollar back",
    )
    assert ledger.available_for(funded_buyer) == wallet + 500_000
    assert audit_ledger() == []


def test_an_operator_marks_payouts_paid_or_rejects_them_in_the_admin(
    admin_client, earning_provider
):
    first = payments.request_payout(earning_provider, 1000)
    second = payments.request_payout(earning_provider, 2000)
    url = "/admin/marketplace/payoutrequest/"
    assert admin_client.get(url).status_code == 200

    form = admin_client.post(url, {"action": "reject", "_selected_action": [second.pk]})
    assert b"Why it is rejected" in form.content
    admin_client.post(
        url,
        {"action": "reject", "_selected_action": [second.pk], "apply": "1", "text": "wrong IBAN"},
    )
    admin_client.post(
        url,
        {"action": "mark_paid", "_selected_action": [first.pk], "apply": "1", "text": "ref 7"},
    )
    first.refresh_from_db()
    second.refresh_from_db()
    assert (first.state, first.note) == ("paid", "ref 7")
    assert (second.state, second.note) == ("rejected", "wrong IBAN")
    assert ledger.payouts_pending_for(earning_provider) == 0
    assert audit_ledger() == []


def test_settlements_stay_exactly_once_with_a_frozen_share(funded_buyer, listing, node):
    order = settled_order(funded_buyer, listing, node)
    again = settle_order(order)
    assert again.pk == order.settlement.pk
    assert Settlement.objects.filter(order=order).count() == 1
    assert EarningsHold.objects.filter(order=order).count() == 1
    assert audit_ledger() == []
