"""Card top-ups through Stripe Checkout (issue 12, "Paying in"), against the local stand-in of
Stripe's API (tests/stripe_standin.py) and webhooks signed with the `stripe` library's own
scheme: credit only from a verified webhook, exactly once; replayed, forged, stale,
inconsistent and out-of-order events credit nothing twice or at all; off without keys.
The races (concurrent duplicate deliveries) are in test_stripe_webhook_pg.py."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
from django.test import Client

from marketplace import ledger, stripe_checkout
from marketplace.audit import audit_ledger
from marketplace.models import CheckoutSession, LedgerTransaction, StripeEvent
from tests.factories import USD
from tests.stripe_standin import StripeStandIn, signed_post

pytestmark = [pytest.mark.db, pytest.mark.django_db]

API_KEY = "sk_test_51MoltStandInSecretKey0123456789"
WEBHOOK_SECRET = "whsec_MoltStandInWebhookSecret0123456789"


@pytest.fixture
def standin(settings) -> Iterator[StripeStandIn]:
    with StripeStandIn(api_key=API_KEY, webhook_secret=WEBHOOK_SECRET) as s:
        settings.STRIPE_SECRET_KEY = API_KEY
        settings.STRIPE_WEBHOOK_SECRET = WEBHOOK_SECRET
        settings.STRIPE_API_BASE = s.base_url
        settings.STRIPE_CHECKOUT_ORIGIN = s.base_url
        yield s


@pytest.fixture
def buyer_client(buyer) -> Client:
    client = Client()
    client.force_login(buyer)
    return client


def start(buyer_client, amount: str = "25") -> CheckoutSession:
    response = buyer_client.post("/wallet/card/", {"amount": amount})
    assert response.status_code == 302, response.content.decode()[:2000]
    row = CheckoutSession.objects.latest("id")
    assert response["Location"].endswith(f"/c/pay/{row.stripe_session_id}")
    return row


def balance(user) -> int:
    return ledger.available_for(user)


# --- off without keys ------------------------------------------------------------------------


def test_without_keys_the_wallet_says_card_payments_are_off_and_nothing_runs(
    settings, buyer, buyer_client
):
    settings.STRIPE_SECRET_KEY = ""
    settings.STRIPE_WEBHOOK_SECRET = ""
    page = buyer_client.get("/wallet/")
    text = page.content.decode()
    assert page.status_code == 200
    assert 'id="card-disabled"' in text and "not configured" in text
    assert 'id="card-form"' not in text

    refused = buyer_client.post("/wallet/card/", {"amount": "25"})
    assert refused.status_code == 404
    assert "not configured" in refused.content.decode()
    webhook = Client().post("/stripe/webhook/", data="{}", content_type="application/json")
    assert webhook.status_code == 404
    assert CheckoutSession.objects.count() == 0 and balance(buyer) == 0


def test_one_key_alone_is_off_too(settings):
    settings.STRIPE_SECRET_KEY = API_KEY
    settings.STRIPE_WEBHOOK_SECRET = ""
    assert not stripe_checkout.enabled()


# --- starting a session ------------------------------------------------------------------------


def test_pay_with_card_starts_a_session_at_stripe_and_redirects_there(standin, buyer, buyer_client):
    page = buyer_client.get("/wallet/")
    assert 'id="card-form"' in page.content.decode()
    # The form is redirected to Stripe's checkout page: the page's CSP lets it go there.
    assert f"form-action 'self' {standin.base_url}" in page["Content-Security-Policy"]

    row = start(buyer_client, "25.50")

    assert row.state == "open" and row.user == buyer and row.amount == 25_500_000
    session = standin.sessions[row.stripe_session_id]
    assert session["amount_total"] == 2550 and session["currency"] == "usd"
    assert session["client_reference_id"] == str(buyer.pk)
    assert session["metadata"]["molt_checkout"] == str(row.pk)
    assert session["success_url"] == f"http://testserver/wallet/card/{row.pk}/"
    assert session["cancel_url"] == f"http://testserver/wallet/card/{row.pk}/?cancelled=1"
    # Starting credits nothing.
    assert balance(buyer) == 0
    assert standin.requests == [("POST", "/v1/checkout/sessions")]


@pytest.mark.parametrize(
    ("amount", "message"),
    [
        ("4.99", "between $5 and $1,000"),
        ("1000.01", "between $5 and $1,000"),
        ("-5", "between $5 and $1,000"),
        ("5.005", "2 decimal places"),
        ("ten", "Enter a number"),
        ("", "required"),
    ],
)
def test_an_amount_out_of_bounds_is_refused_before_stripe_is_asked(
    standin, buyer_client, amount, message
):
    response = buyer_client.post("/wallet/card/", {"amount": amount})
    assert response.status_code == 400
    assert message in response.content.decode()
    assert CheckoutSession.objects.count() == 0 and standin.requests == []


def test_the_service_refuses_amounts_the_form_would_too(buyer, standin):
    for amount in (4_990_000, 1_000_010_000, 5_000_001, True):
        with pytest.raises(stripe_checkout.MarketError):
            stripe_checkout.start_checkout(buyer, amount, return_urls=lambda pk: ("a", "b"))
    assert CheckoutSession.objects.count() == 0


@pytest.mark.parametrize(
    ("amount", "message"),
    [
        (True, "amount must be an integer of micro-USD"),
        (25.0, "amount must be an integer of micro-USD"),
        (5 * USD - 1, "a card top-up is between $5.00 and $1,000.00"),
        (1000 * USD + 1, "a card top-up is between $5.00 and $1,000.00"),
        (5 * USD + 10_000 + 1, "a card top-up is a whole number of cents"),
    ],
)
def test_each_refused_amount_names_the_field_and_the_rule(settings, amount, message):
    with pytest.raises(stripe_checkout.MarketError) as refused:
        stripe_checkout.check_amount(amount)
    assert str(refused.value) == message and refused.value.field == "amount"


def test_the_bounds_themselves_and_a_whole_cent_are_accepted(settings):
    # MOLT_CARD_TOP_UP_MIN_USD and _MAX_USD are inclusive.
    for amount in (5 * USD, 5 * USD + 10_000, 1000 * USD):
        stripe_checkout.check_amount(amount)
    settings.MOLT_CARD_TOP_UP_MIN_USD, settings.MOLT_CARD_TOP_UP_MAX_USD = 20, 30
    assert stripe_checkout.bounds() == (20 * USD, 30 * USD)


@pytest.mark.parametrize(("field", "value"), [("amount_total", 2501), ("currency", "eur")])
def test_stripe_answering_another_amount_or_currency_fails_the_top_up(
    standin, buyer, buyer_client, caplog, field, value
):
    # A session for another amount is not ours to send the buyer to: the row is failed and
    # nothing is opened; the log names the reason's class, never the request.
    create = standin.create_session
    standin.create_session = lambda params: {**create(params), field: value}  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING):
        response = buyer_client.post("/wallet/card/", {"amount": "25"})
    assert response.status_code == 503
    row = CheckoutSession.objects.get()
    assert row.state == "failed" and row.stripe_session_id is None
    assert f"checkout {row.pk}: Stripe did not start a session (ValueError, HTTP None)" in (
        caplog.text
    )


def test_stripe_unreachable_is_a_clear_503_that_names_no_secret(
    settings, standin, buyer, buyer_client, caplog
):
    settings.STRIPE_API_BASE = "http://127.0.0.1:9"  # nothing listens on the discard port
    with caplog.at_level(logging.DEBUG):
        response = buyer_client.post("/wallet/card/", {"amount": "25"})
    assert response.status_code == 503
    text = response.content.decode()
    assert "could not be started; nothing was charged" in text
    assert CheckoutSession.objects.get().state == "failed"
    assert API_KEY not in text and API_KEY not in caplog.text


def test_a_wrong_secret_key_is_refused_by_stripe_and_reported_without_the_key(
    settings, standin, buyer_client, caplog
):
    settings.STRIPE_SECRET_KEY = "sk_test_wrong_key_0123456789"
    with caplog.at_level(logging.DEBUG):
        response = buyer_client.post("/wallet/card/", {"amount": "25"})
    assert response.status_code == 503
    assert "sk_test_wrong" not in response.content.decode() + caplog.text
    assert "AuthenticationError" in caplog.text


# --- the webhook credits once ------------------------------------------------------------------


def test_a_payment_handled_before_the_create_returned_stays_paid(
    standin, buyer, buyer_client, monkeypatch
):
    """Stripe's webhook can be handled before start_checkout has stored the session's id (the
    create answered slowly; the webhook found the row by its metadata, _locked_session). The
    store that follows must not take the paid row back to open (start_checkout 104: the store
    without its state=CREATING guard; the checkout_paid_iff_credited constraint then turns the
    buyer's top-up into a 500)."""
    real = stripe_checkout._client

    def paid_before_create_returns():
        client = real()

        def create(*args, **kwargs):
            session = client.v1.checkout.sessions.create(*args, **kwargs)
            delivered = signed_post(Client(), standin, standin.pay(session.id))
            assert delivered.status_code == 200, delivered.content
            return session

        sessions = type("Sessions", (), {"create": staticmethod(create)})
        checkout = type("Checkout", (), {"sessions": sessions})
        return type("Client", (), {"v1": type("V1", (), {"checkout": checkout})})

    monkeypatch.setattr(stripe_checkout, "_client", paid_before_create_returns)

    response = buyer_client.post("/wallet/card/", {"amount": "25"})

    assert response.status_code == 302, response.content.decode()[:2000]
    row = CheckoutSession.objects.latest("id")
    assert row.state == "paid" and row.completed_at is not None
    assert balance(buyer) == 25 * USD
    assert audit_ledger() == []


def test_a_paid_session_is_credited_once_from_the_signed_webhook(standin, buyer, buyer_client):
    row = start(buyer_client, "25")
    event = standin.pay(row.stripe_session_id)
    # Coming back from Stripe credits nothing: the page says it is waiting.
    back = buyer_client.get(f"/wallet/card/{row.pk}/")
    assert 'id="top-up-pending"' in back.content.decode() and balance(buyer) == 0

    first = signed_post(Client(), standin, event)

    assert first.status_code == 200, first.content
    assert first.json() == {"detail": "credited $25.00"}
    assert balance(buyer) == 25 * USD
    row.refresh_from_db()
    assert row.state == "paid" and row.completed_at is not None
    credit = row.credit
    assert credit.kind == LedgerTransaction.Kind.CARD and credit.once_key == f"checkout:{row.pk}"
    # The memo names the top-up: an operator reading the ledger finds the session from it.
    assert credit.memo == f"card top-up (Stripe Checkout #{row.pk})"
    assert sorted(credit.entries.values_list("amount", flat=True)) == [-25 * USD, 25 * USD]
    assert audit_ledger() == []

    # Stripe retries a delivery it thinks failed: the same event again moves nothing.
    replay = signed_post(Client(), standin, event)
    assert replay.status_code == 200 and replay.json() == {"detail": "event already handled"}
    # Another event about the same session (a second notification of the payment): nothing.
    again = signed_post(
        Client(), standin, standin.event(event["data"]["object"], "checkout.session.completed")
    )
    assert again.status_code == 200 and again.json() == {"detail": "already credited"}
    assert balance(buyer) == 25 * USD
    assert LedgerTransaction.objects.filter(kind="card").count() == 1
    assert StripeEvent.objects.count() == 2

    page = buyer_client.get(f"/wallet/card/{row.pk}/").content.decode()
    assert 'id="top-up-paid"' in page and "$25.00 was added to your wallet" in page
    wallet = buyer_client.get("/wallet/").content.decode()
    assert "card top-up (Stripe Checkout)" in wallet and "paid and credited" in wallet


def test_forged_tampered_stale_and_unsigned_deliveries_change_nothing(standin, buyer, buyer_client):
    row = start(buyer_client, "25")
    event = standin.pay(row.stripe_session_id)
    payload = json.dumps(event)
    client = Client()

    def post(body: str, signature: str | None):
        headers = {} if signature is None else {"HTTP_STRIPE_SIGNATURE": signature}
        return client.post(
            "/stripe/webhook/", data=body, content_type="application/json", **headers
        )

    tampered = json.loads(payload)
    tampered["data"]["object"]["amount_total"] = 250_000
    answers = [
        # Signed with another secret (a forger who does not hold ours).
        signed_post(client, standin, event, secret="whsec_forged"),
        # Our signature over another body.
        post(json.dumps(tampered), standin.sign(payload)),
        # No signature, an empty one, a malformed one.
        post(payload, None),
        post(payload, ""),
        post(payload, "t=notatime,v1=zz"),
        # Correctly signed, but ten minutes old (a captured delivery replayed later).
        signed_post(client, standin, event, timestamp=event["created"] - 600),
        # A scheme other than v1.
        post(payload, standin.sign(payload).replace("v1=", "v0=")),
    ]
    assert [a.status_code for a in answers] == [400] * len(answers)
    assert all("signature" in a.json()["detail"].lower() for a in answers)
    assert balance(buyer) == 0 and StripeEvent.objects.count() == 0
    assert CheckoutSession.objects.get().state == "open"


@pytest.mark.parametrize(
    "body",
    ["", "not json", "[]", "null", '"text"', "{}", '{"id": "evt_1", "type": "x"}',
     '{"id": "evt_1", "type": "checkout.session.completed", "data": {"object": []}}',
     '{"id": 5, "type": "checkout.session.completed", "data": {"object": {}}}',
     '{"id": "evt_1", "type": "checkout.session.completed", "data": {"object": {}}}',
     "\udcff"],
)  # fmt: skip
def test_bad_bodies_with_a_valid_signature_are_4xx_never_5xx(standin, buyer, body):
    payload = body.encode("utf-8", "surrogateescape") if body == "\udcff" else body.encode()
    text = payload.decode("utf-8", "replace")
    response = Client().post(
        "/stripe/webhook/",
        data=payload,
        content_type="application/json",
        HTTP_STRIPE_SIGNATURE=standin.sign(text),
    )
    assert 400 <= response.status_code < 500, response.content
    assert balance(buyer) == 0


def test_a_session_this_gateway_did_not_start_is_refused_and_credits_nothing(standin, buyer):
    foreign = standin.create_session(
        {
            "mode": "payment",
            "success_url": "https://elsewhere.example/ok",
            "line_items": {"0": {"quantity": "1", "price_data": {"currency": "usd",
                                                                 "unit_amount": "5000"}}},
            "client_reference_id": str(buyer.pk),
            "metadata": {"molt_checkout": "999999"},
        }
    )  # fmt: skip
    response = signed_post(Client(), standin, standin.pay(foreign["id"]))
    assert response.status_code == 404
    assert balance(buyer) == 0 and StripeEvent.objects.count() == 0


@pytest.mark.parametrize(
    ("field", "value", "detail"),
    [
        (
            "amount_total",
            2600,
            "the session's amount is not the amount this top-up was started for",
        ),
        ("amount_total", None, "the session has no amount_total"),
        ("amount_total", "2500", "the session has no amount_total"),
        ("amount_total", True, "the session has no amount_total"),
        ("currency", "eur", "the session's currency is not usd"),
        ("currency", None, "the session's currency is not usd"),
        ("client_reference_id", "424242", "the session belongs to another user"),
    ],
)
def test_a_signed_event_that_disagrees_with_the_started_top_up_credits_nothing(
    standin, buyer, buyer_client, field, value, detail
):
    row = start(buyer_client, "25")
    event = standin.pay(row.stripe_session_id)
    event["data"]["object"][field] = value
    response = signed_post(Client(), standin, event)
    # The whole answer: Stripe's dashboard shows it to whoever looks into a failed delivery.
    assert response.status_code == 400 and response.json() == {"detail": detail}
    assert balance(buyer) == 0
    # Nothing was recorded: Stripe's retry is looked at afresh (and refused again).
    assert StripeEvent.objects.count() == 0
    assert CheckoutSession.objects.get().state == "open"


# --- order and state ---------------------------------------------------------------------------


def test_expired_after_completed_reverses_nothing(standin, buyer, buyer_client):
    row = start(buyer_client, "25")
    paid = standin.pay(row.stripe_session_id)
    session = paid["data"]["object"]
    assert signed_post(Client(), standin, paid).status_code == 200
    for late in ("checkout.session.expired", "checkout.session.async_payment_failed"):
        answer = signed_post(Client(), standin, standin.event(session, late))
        assert answer.status_code == 200
        assert answer.json() == {"detail": "ignored: the top-up is already paid"}
    row.refresh_from_db()
    assert row.state == "paid" and balance(buyer) == 25 * USD
    assert LedgerTransaction.objects.filter(kind="card").count() == 1
    assert audit_ledger() == []


def test_completed_after_expired_still_credits_once_since_stripe_took_the_money(
    standin, buyer, buyer_client
):
    row = start(buyer_client, "25")
    session = dict(standin.sessions[row.stripe_session_id])
    expired = standin.event({**session, "status": "expired"}, "checkout.session.expired")
    assert signed_post(Client(), standin, expired).json() == {"detail": "expired unpaid"}
    row.refresh_from_db()
    assert row.state == "expired"
    assert 'id="top-up-expired"' in buyer_client.get(f"/wallet/card/{row.pk}/").content.decode()

    paid = standin.pay(row.stripe_session_id)
    assert signed_post(Client(), standin, paid).json() == {"detail": "credited $25.00"}
    assert signed_post(Client(), standin, expired).json() == {"detail": "event already handled"}
    row.refresh_from_db()
    assert row.state == "paid" and balance(buyer) == 25 * USD


def test_a_completed_session_not_yet_paid_waits_for_async_payment_succeeded(
    standin, buyer, buyer_client
):
    row = start(buyer_client, "40")
    session = {**standin.sessions[row.stripe_session_id], "status": "complete"}
    unpaid = standin.event({**session, "payment_status": "unpaid"}, "checkout.session.completed")
    answer = signed_post(Client(), standin, unpaid)
    assert answer.status_code == 200 and "not paid yet" in answer.json()["detail"]
    assert balance(buyer) == 0

    succeeded = standin.event(
        {**session, "payment_status": "paid"}, "checkout.session.async_payment_succeeded"
    )
    assert signed_post(Client(), standin, succeeded).json() == {"detail": "credited $40.00"}
    assert balance(buyer) == 40 * USD


def test_other_event_types_are_acknowledged_and_ignored(standin, buyer):
    event = {"id": "evt_x", "object": "event", "type": "charge.succeeded",
             "data": {"object": {"id": "ch_1", "object": "charge"}}}  # fmt: skip
    response = signed_post(Client(), standin, event)
    assert response.status_code == 200 and "ignored" in response.json()["detail"]
    assert StripeEvent.objects.count() == 0


def test_a_session_whose_id_was_never_stored_is_matched_by_its_metadata(
    standin, buyer, buyer_client
):
    """start_checkout cut off between Stripe's answer and our update: the row has no Stripe id
    yet. The paid session names our row in its metadata, so the money is not lost."""
    row = start(buyer_client, "25")
    stripe_id = row.stripe_session_id
    CheckoutSession.objects.filter(pk=row.pk).update(stripe_session_id=None, state="creating")
    assert signed_post(Client(), standin, standin.pay(stripe_id)).status_code == 200
    row.refresh_from_db()
    assert row.state == "paid" and row.stripe_session_id == stripe_id
    assert balance(buyer) == 25 * USD


def test_a_session_matched_by_its_metadata_binds_the_row_it_names_not_another_cut_off_one(
    standin, buyer, buyer_client
):
    # Three top-ups of the buyer cut off alike (no Stripe id, still creating): the paid session
    # of the middle one (neither the first nor the last by id) binds and credits that one, and
    # the others keep waiting for their own.
    rows = [start(buyer_client, "25") for _ in range(3)]
    stripe_ids = [row.stripe_session_id for row in rows]
    CheckoutSession.objects.update(stripe_session_id=None, state="creating")
    assert signed_post(Client(), standin, standin.pay(stripe_ids[1])).status_code == 200
    for row in rows:
        row.refresh_from_db()
    assert [(row.state, row.stripe_session_id) for row in rows] == [
        ("creating", None), ("paid", stripe_ids[1]), ("creating", None)
    ]  # fmt: skip
    assert balance(buyer) == 25 * USD


def test_a_row_bound_to_its_stripe_session_is_never_rebound_to_another_naming_it(
    standin, buyer, buyer_client
):
    # Metadata matches only a row that never got its Stripe id. A row that has one (here a
    # failed start whose session a webhook bound since) keeps it: were another session naming
    # the row to take it over, a later payment of the row's own session would find no row.
    row = start(buyer_client, "25")
    CheckoutSession.objects.filter(pk=row.pk).update(state="failed")
    other = standin.create_session(
        {"mode": "payment", "success_url": "https://elsewhere.example/ok",
         "metadata": {"molt_checkout": str(row.pk)},
         "line_items": {"0": {"price_data": {"currency": "usd", "unit_amount": "2500"}}}}
    )  # fmt: skip
    response = signed_post(Client(), standin, standin.pay(other["id"]))
    assert response.status_code == 404
    kept = CheckoutSession.objects.get(pk=row.pk)
    assert (kept.state, kept.stripe_session_id) == ("failed", row.stripe_session_id)
    assert balance(buyer) == 0


# --- the return pages --------------------------------------------------------------------------


def test_the_return_pages_say_what_happened_and_are_the_buyers_own(
    standin, buyer, buyer_client, make_user
):
    row = start(buyer_client, "25")
    pending = buyer_client.get(f"/wallet/card/{row.pk}/").content.decode()
    assert "Waiting for Stripe to confirm" in pending and 'http-equiv="refresh"' in pending
    cancelled = buyer_client.get(f"/wallet/card/{row.pk}/?cancelled=1").content.decode()
    assert "nothing was charged" in cancelled and 'http-equiv="refresh"' not in cancelled

    other = Client()
    other.force_login(make_user("mallory"))
    assert other.get(f"/wallet/card/{row.pk}/").status_code == 404
    assert Client().get(f"/wallet/card/{row.pk}/").status_code == 302  # to the log-in page


def test_session_of_is_the_buyers_top_up_of_that_number_only(
    standin, buyer, buyer_client, make_user
):
    # The return page of each top-up shows that one: with two, each number finds its own.
    first, second = start(buyer_client, "25"), start(buyer_client, "30")
    assert stripe_checkout.session_of(buyer, first.pk) == first
    assert stripe_checkout.session_of(buyer, second.pk) == second
    assert stripe_checkout.session_of(make_user("mallory"), second.pk) is None


def test_no_secret_reaches_the_logs_or_the_answers(standin, buyer, buyer_client, caplog):
    with caplog.at_level(logging.DEBUG):
        row = start(buyer_client, "25")
        event = standin.pay(row.stripe_session_id)
        answers = [
            signed_post(Client(), standin, event),
            signed_post(Client(), standin, event, secret="whsec_forged"),
        ]
    signature = standin.sign(json.dumps(event)).split("v1=")[1]
    seen = caplog.text + "".join(a.content.decode() for a in answers)
    for secret in (API_KEY, WEBHOOK_SECRET, signature):
        assert secret not in seen


def test_the_audit_finds_a_card_credit_without_its_top_up(buyer):
    assert audit_ledger() == []
    ledger.post(
        LedgerTransaction.Kind.CARD,
        [(ledger.world_account(), -5 * USD), (ledger.wallet_account(buyer), 5 * USD)],
        memo="a card credit nobody paid for",
    )
    [violation] = audit_ledger()
    assert "belongs to no paid card top-up" in violation


def test_the_audit_finds_a_top_up_credited_with_another_amount(standin, buyer, buyer_client):
    row = start(buyer_client, "25")
    txn = ledger.post(
        LedgerTransaction.Kind.CARD,
        [(ledger.world_account(), -5 * USD), (ledger.wallet_account(buyer), 5 * USD)],
        once_key=f"checkout:{row.pk}",
    )
    CheckoutSession.objects.filter(pk=row.pk).update(state="paid", credit=txn)
    [violation] = audit_ledger()
    assert violation == (
        f"card top-up #{row.pk} did not put exactly its amount into its buyer's wallet"
    )


# --- what the webhook answers and logs, word for word -------------------------------------------
# Stripe's dashboard shows a delivery's answer to whoever looks into it, and the log line is the
# operator's record of each event: people read both, so these tests read them whole.

NOT_JSON = "the body is not a JSON event"
NOT_AN_EVENT = "not a Stripe event (id, type and data.object are required)"


def test_the_webhook_while_card_payments_are_off_answers_404_saying_so(settings):
    settings.STRIPE_SECRET_KEY = ""
    settings.STRIPE_WEBHOOK_SECRET = ""
    answer = stripe_checkout.handle_webhook(b"{}", None)
    assert answer == stripe_checkout.WebhookAnswer(
        404, "card payments are not configured on this marketplace"
    )


def test_an_event_of_another_type_is_answered_200_by_handle_webhook_itself(standin, buyer):
    # The view answers a status of None with 200 too: the service's own answer is read here.
    payload = json.dumps(standin.event({"id": "ch_1"}, "charge.refunded"))
    answer = stripe_checkout.handle_webhook(payload.encode(), standin.sign(payload))
    assert answer == stripe_checkout.WebhookAnswer(
        200, "ignored: charge.refunded is not a checkout event"
    )


def test_a_delivery_that_does_not_verify_is_answered_400_naming_the_signature(standin, buyer):
    payload = json.dumps(standin.event({"id": "cs_x"}, "checkout.session.completed"))
    answer = stripe_checkout.handle_webhook(
        payload.encode(), standin.sign(payload, secret="whsec_forged")
    )
    assert answer == stripe_checkout.WebhookAnswer(
        400, "the Stripe-Signature header does not verify this body"
    )


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ("not json", NOT_JSON),
        ("[]", NOT_JSON),
        ('{"id": "evt_1", "type": "checkout.session.completed"}', NOT_AN_EVENT),
        ('{"id": "evt_1", "type": "checkout.session.completed", "data": []}', NOT_AN_EVENT),
        ('{"id": "evt_1", "type": "checkout.session.completed", "data": {"object": []}}',
         NOT_AN_EVENT),
        # Each of id, type and data.object alone missing, the other two there.
        ('{"type": "checkout.session.completed", "data": {"object": {"id": "cs_1"}}}',
         NOT_AN_EVENT),
        ('{"id": "", "type": "checkout.session.completed", "data": {"object": {"id": "cs_1"}}}',
         NOT_AN_EVENT),
        ('{"id": 5, "type": "checkout.session.completed", "data": {"object": {"id": "cs_1"}}}',
         NOT_AN_EVENT),
        ('{"id": "evt_1", "data": {"object": {"id": "cs_1"}}}', NOT_AN_EVENT),
        ('{"id": "evt_1", "type": "checkout.session.completed", "data": {"object": "cs_1"}}',
         NOT_AN_EVENT),
        ('{"id": "evt_1", "type": "checkout.session.completed", "data": {"object": {}}}',
         "the event's session has no id"),
    ],
)  # fmt: skip
def test_a_signed_body_that_is_not_a_checkout_event_is_answered_with_what_is_wrong(
    standin, buyer, body, detail
):
    answer = stripe_checkout.handle_webhook(body.encode(), standin.sign(body))
    assert answer == stripe_checkout.WebhookAnswer(400, detail)
    assert StripeEvent.objects.count() == 0


def test_another_event_type_is_acknowledged_naming_it_cut_to_60_characters(standin, buyer):
    for event_type, named in (
        ("charge.succeeded", "charge.succeeded"),
        ("x" * 70, "x" * 60),
    ):
        event = {"id": "evt_x", "type": event_type, "data": {"object": {"id": "ch_1"}}}
        response = signed_post(Client(), standin, event)
        assert response.status_code == 200
        assert response.json() == {"detail": f"ignored: {named} is not a checkout event"}
    assert StripeEvent.objects.count() == 0


def test_a_session_this_gateway_did_not_start_is_answered_404_saying_so(standin, buyer):
    foreign = standin.create_session(
        {"mode": "payment", "success_url": "https://elsewhere.example/ok",
         "line_items": {"0": {"price_data": {"currency": "usd", "unit_amount": "500"}}}}
    )  # fmt: skip
    response = signed_post(Client(), standin, standin.pay(foreign["id"]))
    assert response.status_code == 404
    assert response.json() == {"detail": "no top-up of this marketplace has this checkout session"}


@pytest.mark.parametrize("metadata", [None, ["molt_checkout"], "1"])
def test_a_foreign_session_whose_metadata_is_not_an_object_is_answered_404_not_a_crash(
    standin, buyer, metadata
):
    # Only our rows' metadata is known to be an object; another integration's session (or a
    # hand-made event) may carry null or anything else there.
    foreign = standin.create_session(
        {"mode": "payment", "success_url": "https://elsewhere.example/ok",
         "line_items": {"0": {"price_data": {"currency": "usd", "unit_amount": "500"}}}}
    )  # fmt: skip
    event = standin.pay(foreign["id"])
    event["data"]["object"]["metadata"] = metadata
    response = signed_post(Client(), standin, event)
    assert response.status_code == 404
    assert response.json() == {"detail": "no top-up of this marketplace has this checkout session"}


def test_each_handled_event_is_recorded_and_logged_with_its_id_type_and_answer(
    standin, buyer, buyer_client, caplog
):
    row = start(buyer_client, "25")
    session = {**standin.sessions[row.stripe_session_id], "status": "complete"}
    unpaid = standin.event({**session, "payment_status": "unpaid"}, "checkout.session.completed")
    unpaid["id"] = "evt_" + "a" * 90  # the log line keeps the id's first 80 characters
    paid = standin.pay(row.stripe_session_id)
    with caplog.at_level(logging.INFO, logger="marketplace.stripe_checkout"):
        waiting = signed_post(Client(), standin, unpaid)
        credited = signed_post(Client(), standin, paid)
        replayed = stripe_checkout.handle_webhook(
            json.dumps(paid).encode(), standin.sign(json.dumps(paid))
        )
    assert replayed == stripe_checkout.WebhookAnswer(200, "event already handled")
    assert waiting.json() == {"detail": "not paid yet: waiting for the payment to clear"}
    assert credited.json() == {"detail": "credited $25.00"}
    lines = [r.getMessage() for r in caplog.records if r.name == "marketplace.stripe_checkout"]
    assert lines == [
        f"stripe event {unpaid['id'][:80]} (checkout.session.completed): 200 not paid yet: "
        "waiting for the payment to clear",
        f"stripe event {paid['id']} (checkout.session.completed): 200 credited $25.00",
        f"stripe event {paid['id']} (checkout.session.completed): 200 event already handled",
    ]
    recorded = list(
        StripeEvent.objects.order_by("id").values_list("event_id", "type", "session", "outcome")
    )
    assert recorded == [
        (unpaid["id"], "checkout.session.completed", row.pk,
         "not paid yet: waiting for the payment to clear"),
        (paid["id"], "checkout.session.completed", row.pk, "credited $25.00"),
    ]  # fmt: skip


# --- what start_checkout asks Stripe for, and says when it cannot --------------------------------


def test_the_session_asks_stripe_for_one_wallet_credit_under_the_rows_idempotency_key(
    standin, buyer, buyer_client
):
    # A top-up cut off earlier (still creating, no Stripe id) is not touched by this one.
    earlier = CheckoutSession.objects.create(user=buyer, amount=5 * USD, currency="usd")
    row = start(buyer_client, "25.50")
    assert standin.created == [
        {
            "mode": "payment",
            "line_items": {"0": {"quantity": "1", "price_data": {
                "currency": "usd", "unit_amount": "2550",
                "product_data": {"name": "MOLT wallet credit"}}}},
            "client_reference_id": str(buyer.pk),
            "metadata": {"molt_checkout": str(row.pk), "molt_user": str(buyer.pk)},
            "success_url": f"http://testserver/wallet/card/{row.pk}/",
            "cancel_url": f"http://testserver/wallet/card/{row.pk}/?cancelled=1",
        }
    ]  # fmt: skip
    assert standin.sessions[row.stripe_session_id]["mode"] == "payment"
    # Stripe's idempotency key names our row: a retried create returns the same session.
    assert standin.idempotent == {f"molt-checkout-{row.pk}": row.stripe_session_id}
    earlier.refresh_from_db()
    assert earlier.state == "creating" and earlier.stripe_session_id is None


def test_start_checkout_while_card_payments_are_off_says_so(settings, buyer):
    settings.STRIPE_SECRET_KEY = ""
    with pytest.raises(stripe_checkout.CardPaymentsUnavailable) as refused:
        stripe_checkout.start_checkout(buyer, 25 * USD, return_urls=lambda pk: ("a", "b"))
    assert str(refused.value) == "card payments are not configured on this marketplace"
    assert CheckoutSession.objects.count() == 0


def test_stripe_refusing_the_session_is_logged_with_its_class_and_http_status(
    settings, standin, buyer, caplog
):
    settings.STRIPE_SECRET_KEY = "sk_test_wrong_key_0123456789"
    with (
        caplog.at_level(logging.WARNING),
        pytest.raises(stripe_checkout.CardPaymentsUnavailable) as refused,
    ):
        stripe_checkout.start_checkout(
            buyer, 25 * USD, return_urls=lambda pk: ("https://a.example/", "https://b.example/")
        )
    assert str(refused.value) == (
        "the card payment could not be started; nothing was charged, try again in a minute"
    )
    row = CheckoutSession.objects.get()
    assert row.state == "failed" and row.stripe_session_id is None
    assert (
        f"checkout {row.pk}: Stripe did not start a session (AuthenticationError, HTTP 401)"
        in caplog.messages
    )


def test_stripe_failing_is_retried_twice_then_the_top_up_fails(standin, buyer, buyer_client):
    # Stripe's 500s are retried (under the same idempotency key) twice, not more: a third
    # failure fails the top-up, and two are ridden out.
    standin.failures = 3
    assert buyer_client.post("/wallet/card/", {"amount": "25"}).status_code == 503
    assert standin.requests == [("POST", "/v1/checkout/sessions")] * 3
    assert CheckoutSession.objects.get().state == "failed"

    standin.failures = 2
    row = start(buyer_client, "25")
    assert row.state == "open" and len(standin.requests) == 6


def test_a_credit_already_posted_under_the_sessions_once_key_is_not_posted_again(
    standin, buyer, buyer_client
):
    # The row is still open but the ledger already holds its credit (the unique once_key
    # "checkout:<id>"): the webhook answers "already credited" and moves no money.
    row = start(buyer_client, "25")
    ledger.post(
        LedgerTransaction.Kind.CARD,
        [(ledger.world_account(), -25 * USD), (ledger.wallet_account(buyer), 25 * USD)],
        once_key=f"checkout:{row.pk}",
    )
    response = signed_post(Client(), standin, standin.pay(row.stripe_session_id))
    assert response.status_code == 200 and response.json() == {"detail": "already credited"}
    assert balance(buyer) == 25 * USD
    assert LedgerTransaction.objects.filter(kind="card").count() == 1
