"""Stripe's webhook under concurrent duplicate deliveries, on PostgreSQL (issue 12, "Paying
in"): Stripe delivers at least once and may deliver the same event, or several events about
one session, at the same moment to several gateway processes. Real threads, each with its own
connection, post signed events through the real view; every session is credited exactly once,
and the ledger audit stays clean. The last test removes the row lock to show that the unique
once_key alone still refuses the second credit (the DB constraint is the rule, the lock only
makes the loser wait)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
from django.db import connection
from django.test import Client

from marketplace import ledger, stripe_checkout
from marketplace.audit import audit_ledger
from marketplace.models import CheckoutSession, LedgerTransaction, StripeEvent
from tests.db.test_concurrency_pg import in_threads
from tests.factories import USD
from tests.stripe_standin import StripeStandIn, signed_post

pytestmark = [pytest.mark.db, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

ROUNDS = 10
THREADS = 8


@pytest.fixture
def standin(settings) -> Iterator[StripeStandIn]:
    with StripeStandIn(api_key="sk_test_pg_race", webhook_secret="whsec_pg_race") as s:
        settings.STRIPE_SECRET_KEY = s.api_key
        settings.STRIPE_WEBHOOK_SECRET = s.webhook_secret
        settings.STRIPE_API_BASE = s.base_url
        yield s


def started(standin, buyer, dollars: int) -> CheckoutSession:
    stripe_checkout.start_checkout(
        buyer, dollars * USD, return_urls=lambda pk: (f"http://t/{pk}/", f"http://t/{pk}/?c=1")
    )
    return CheckoutSession.objects.latest("id")


def deliver_all(standin, events: list[dict]) -> list[tuple[int, str]]:
    def one(i: int) -> tuple[int, str]:
        response = signed_post(Client(), standin, events[i])
        return response.status_code, response.json()["detail"]

    return in_threads(len(events), one)


def test_the_same_event_delivered_by_eight_threads_at_once_credits_once(standin, buyer):
    assert connection.vendor == "postgresql"
    details: Counter[str] = Counter()
    for round_ in range(ROUNDS):
        row = started(standin, buyer, 5 + round_)
        event = standin.pay(row.stripe_session_id)
        answers = deliver_all(standin, [event] * THREADS)
        assert {status for status, _ in answers} == {200}, answers
        details.update(detail for _, detail in answers)
        assert [d for _, d in answers].count(f"credited ${5 + round_}.00") == 1, answers

    expected = sum(5 + r for r in range(ROUNDS)) * USD
    assert ledger.available_for(buyer) == expected
    assert LedgerTransaction.objects.filter(kind="card").count() == ROUNDS
    assert StripeEvent.objects.count() == ROUNDS
    assert set(CheckoutSession.objects.values_list("state", flat=True)) == {"paid"}
    assert details["event already handled"] == ROUNDS * (THREADS - 1)
    assert audit_ledger() == []


def test_replays_other_events_and_a_late_expiry_racing_on_one_session_credit_once(standin, buyer):
    for round_ in range(ROUNDS):
        row = started(standin, buyer, 20)
        completed = standin.pay(row.stripe_session_id)
        session = completed["data"]["object"]
        events = (
            [completed] * 3
            + [standin.event(session, "checkout.session.completed") for _ in range(2)]
            + [standin.event(session, "checkout.session.async_payment_succeeded")]
            + [standin.event({**session, "status": "expired"}, "checkout.session.expired")] * 2
        )
        answers = deliver_all(standin, events)
        assert {status for status, _ in answers} == {200}, answers
        assert sum(d.startswith("credited") for _, d in answers) == 1, (round_, answers)
        row.refresh_from_db()
        assert row.state == "paid", (round_, answers)

    assert ledger.available_for(buyer) == ROUNDS * 20 * USD
    assert LedgerTransaction.objects.filter(kind="card").count() == ROUNDS
    assert audit_ledger() == []


def test_without_the_row_lock_the_unique_once_key_still_refuses_the_second_credit(
    standin, buyer, monkeypatch
):
    def unlocked(session: dict) -> CheckoutSession | None:
        return CheckoutSession.objects.filter(stripe_session_id=session["id"]).first()

    monkeypatch.setattr(stripe_checkout, "_locked_session", unlocked)
    for _ in range(ROUNDS):
        row = started(standin, buyer, 10)
        completed = standin.pay(row.stripe_session_id)
        session = completed["data"]["object"]
        # Different event ids, so the event table does not stop them: only the once_key can.
        events = [standin.event(session, "checkout.session.completed") for _ in range(THREADS)]
        answers = deliver_all(standin, events)
        assert {status for status, _ in answers} == {200}, answers
        assert sum(d.startswith("credited") for _, d in answers) == 1, answers

    assert ledger.available_for(buyer) == ROUNDS * 10 * USD
    assert LedgerTransaction.objects.filter(kind="card").count() == ROUNDS
    assert audit_ledger() == []
