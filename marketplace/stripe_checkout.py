"""Card top-ups through Stripe Checkout (issue 12, "Paying in").

The wallet page starts a Checkout session (start_checkout) and sends the buyer to Stripe's
hosted page. Nothing is credited on the way back: the buyer's return proves nothing. Credit
lands only from Stripe's signed webhook (handle_webhook), verified with the `stripe` library,
and exactly once:

- the event's signature and age are checked by stripe.Webhook.construct_event (forged, altered
  or stale bodies are refused with 400 and change nothing);
- the session must be one this gateway started (else 404, nothing credited), and the verified
  amount and currency must be what was stored when it was started (else 400);
- the credit is one ledger transaction (kind CARD, outside world -> the buyer's wallet) with the
  unique once_key "checkout:<id>", and CheckoutSession.credit is unique: two deliveries of the
  same event, or two different events about one session, cannot both credit, even racing on
  two connections (the session row is locked first; the unique keys hold without the lock);
- every handled event id is stored (StripeEvent.event_id unique), so a replay answers 200
  "already handled" and moves nothing;
- states only move forward: an `expired` arriving after the credit changes nothing, and a paid
  session is never un-credited by a webhook (refunds are an operator's business).

Amounts: the ledger's unit is micro-USD; Stripe's for USD is the cent. A top-up is a whole
number of cents between the MOLT_CARD_TOP_UP_MIN_USD and _MAX_USD settings.

Off unless both STRIPE_SECRET_KEY and STRIPE_WEBHOOK_SECRET are set: then the wallet page says
card payments are not configured and the webhook answers 404. Secrets never reach logs or
answers: errors name what was wrong, not the key or the signature.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import stripe
from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from marketplace import ledger
from marketplace.errors import AlreadyResolved, MarketError
from marketplace.models import CheckoutSession, LedgerTransaction, StripeEvent
from marketplace.money import MICRO_PER_USD, format_usd

log = logging.getLogger(__name__)

CURRENCY = "usd"
MICRO_PER_CENT = MICRO_PER_USD // 100
# Events that say a session's money arrived, and events that say it never will.
PAID_EVENTS = {"checkout.session.completed", "checkout.session.async_payment_succeeded"}
UNPAID_EVENTS = {"checkout.session.expired", "checkout.session.async_payment_failed"}

S = CheckoutSession.State


class CardPaymentsUnavailable(MarketError):
    status_code = 503
    code = "card_payments_unavailable"


def enabled() -> bool:
    """Card top-ups are on when both Stripe keys are configured."""
    return bool(settings.STRIPE_SECRET_KEY and settings.STRIPE_WEBHOOK_SECRET)


def bounds() -> tuple[int, int]:
    """The smallest and largest card top-up, in micro-USD."""
    return (
        settings.MOLT_CARD_TOP_UP_MIN_USD * MICRO_PER_USD,
        settings.MOLT_CARD_TOP_UP_MAX_USD * MICRO_PER_USD,
    )


def check_amount(amount: int) -> None:
    """Refuse (MarketError, field "amount") an amount out of bounds or finer than a cent."""
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise MarketError("amount must be an integer of micro-USD", field="amount")
    low, high = bounds()
    if not low <= amount <= high:
        raise MarketError(
            f"a card top-up is between {format_usd(low)} and {format_usd(high)}", field="amount"
        )
    if amount % MICRO_PER_CENT:
        raise MarketError("a card top-up is a whole number of cents", field="amount")


def _client() -> stripe.StripeClient:
    return stripe.StripeClient(
        settings.STRIPE_SECRET_KEY,
        base_addresses={"api": settings.STRIPE_API_BASE},
        max_network_retries=2,
    )


def start_checkout(user, amount: int, *, return_urls: Callable[[int], tuple[str, str]]) -> str:
    """Start a Checkout session for `user` to pay `amount` micro-USD; return the Stripe-hosted
    URL to send the buyer to. `return_urls(id)` gives the pages Stripe sends the buyer back to
    after paying and after cancelling, for our session's id.

    Our row is written first (state CREATING), so Stripe's idempotency key and the session's
    metadata name it: a retried create returns the same session, and a webhook for a session
    whose id we failed to store can still be matched (see _locked_session). Raises
    MarketError for a bad amount, CardPaymentsUnavailable when card top-ups are off or Stripe
    cannot be reached (the row is marked FAILED)."""
    if not enabled():
        raise CardPaymentsUnavailable("card payments are not configured on this marketplace")
    check_amount(amount)
    row = CheckoutSession.objects.create(user=user, amount=amount, currency=CURRENCY)
    cents = amount // MICRO_PER_CENT
    return_url, cancel_url = return_urls(row.pk)
    try:
        session = _client().v1.checkout.sessions.create(
            params={
                "mode": "payment",
                "line_items": [
                    {
                        "quantity": 1,
                        "price_data": {
                            "currency": CURRENCY,
                            "unit_amount": cents,
                            "product_data": {"name": "MOLT wallet credit"},
                        },
                    }
                ],
                "client_reference_id": str(user.pk),
                "metadata": {"molt_checkout": str(row.pk), "molt_user": str(user.pk)},
                "success_url": return_url,
                "cancel_url": cancel_url,
            },
            options={"idempotency_key": f"molt-checkout-{row.pk}"},
        )
        session_id, url = str(session.id), str(session.url)
        if session.amount_total != cents or str(session.currency).lower() != CURRENCY:
            raise ValueError("Stripe answered with another amount or currency")
    except (stripe.StripeError, ValueError, AttributeError, KeyError) as exc:
        CheckoutSession.objects.filter(pk=row.pk).update(state=S.FAILED)
        # The exception's class and HTTP status only: its message may quote the request.
        log.warning(
            "checkout %s: Stripe did not start a session (%s, HTTP %s)",
            row.pk,
            type(exc).__name__,
            getattr(exc, "http_status", None),
        )
        raise CardPaymentsUnavailable(
            "the card payment could not be started; nothing was charged, try again in a minute"
        ) from None
    CheckoutSession.objects.filter(pk=row.pk, state=S.CREATING).update(
        stripe_session_id=session_id, state=S.OPEN
    )
    return url


# --- the webhook -------------------------------------------------------------------------------


@dataclass(frozen=True)
class WebhookAnswer:
    status: int
    detail: str


class _Refuse(Exception):
    """Refuse the event with a 4xx and roll back everything the handler wrote."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.answer = WebhookAnswer(status, detail)


def _text(obj: dict, key: str) -> str | None:
    value = obj.get(key)
    return value if isinstance(value, str) and value else None


def _locked_session(session: dict) -> CheckoutSession | None:
    """Our row for Stripe's `session`, locked; None for a session this gateway did not start.
    Matched by Stripe's session id, or else by the metadata's row id where our row never got
    its Stripe id (start_checkout was cut off between Stripe's answer and our update)."""
    session_id = _text(session, "id")
    if session_id is None:
        raise _Refuse(400, "the event's session has no id")
    row = CheckoutSession.objects.select_for_update().filter(stripe_session_id=session_id).first()
    if row is not None:
        return row
    metadata = session.get("metadata")
    pk = _text(metadata, "molt_checkout") if isinstance(metadata, dict) else None
    if pk is None or not pk.isdigit():
        return None
    row = (
        CheckoutSession.objects.select_for_update()
        .filter(pk=int(pk), stripe_session_id__isnull=True, state__in=[S.CREATING, S.FAILED])
        .first()
    )
    if row is not None:
        row.stripe_session_id = session_id
        row.save(update_fields=["stripe_session_id"])
    return row


def _credit(row: CheckoutSession, session: dict) -> str:
    """Credit `row` from a verified paid session, once. The caller holds the row's lock."""
    if row.state == S.PAID:
        return "already credited"
    amount_total, currency = session.get("amount_total"), session.get("currency")
    if isinstance(amount_total, bool) or not isinstance(amount_total, int):
        raise _Refuse(400, "the session has no amount_total")
    if not isinstance(currency, str) or currency.lower() != row.currency:
        raise _Refuse(400, f"the session's currency is not {row.currency}")
    if amount_total * MICRO_PER_CENT != row.amount:
        raise _Refuse(400, "the session's amount is not the amount this top-up was started for")
    reference = session.get("client_reference_id")
    if reference is not None and reference != str(row.user_id):
        raise _Refuse(400, "the session belongs to another user")
    try:
        txn = ledger.post(
            LedgerTransaction.Kind.CARD,
            [(ledger.world_account(), -row.amount), (ledger.wallet_account(row.user), row.amount)],
            memo=f"card top-up (Stripe Checkout #{row.pk})",
            once_key=f"checkout:{row.pk}",
        )
    except AlreadyResolved:
        return "already credited"
    updated = (
        CheckoutSession.objects.filter(pk=row.pk)
        .exclude(state=S.PAID)
        .update(state=S.PAID, credit=txn, completed_at=timezone.now())
    )
    if updated != 1:  # pragma: no cover - the row lock and the once_key make this unreachable
        raise _Refuse(409, "this top-up was already credited")  # rolls the posting back
    return f"credited {format_usd(row.amount)}"


def _apply(event_id: str, event_type: str, session: dict) -> WebhookAnswer:
    with transaction.atomic():
        row = _locked_session(session)
        if row is None:
            raise _Refuse(404, "no top-up of this marketplace has this checkout session")
        try:
            with transaction.atomic():
                record = StripeEvent.objects.create(
                    event_id=event_id, type=event_type, session=row, outcome="handling"
                )
        except IntegrityError:
            return WebhookAnswer(200, "event already handled")
        if event_type in PAID_EVENTS:
            if session.get("payment_status") == "paid":
                outcome = _credit(row, session)
            else:
                outcome = "not paid yet: waiting for the payment to clear"
        elif row.state in (S.OPEN, S.CREATING, S.FAILED):
            CheckoutSession.objects.filter(pk=row.pk).update(state=S.EXPIRED)
            outcome = "expired unpaid"
        else:
            outcome = f"ignored: the top-up is already {row.state}"
        StripeEvent.objects.filter(pk=record.pk).update(outcome=outcome[:200])
    return WebhookAnswer(200, outcome)


def handle_webhook(payload: bytes, signature: str | None) -> WebhookAnswer:
    """Verify and apply one webhook delivery. Never raises for bad input: the answer's status
    is 200 (applied, or nothing to do), 400 (unverifiable or inconsistent: nothing written),
    404 (card payments off, or a session this gateway did not start: nothing credited)."""
    if not enabled():
        return WebhookAnswer(404, "card payments are not configured on this marketplace")
    try:
        stripe.Webhook.construct_event(payload, signature, settings.STRIPE_WEBHOOK_SECRET)
    except stripe.SignatureVerificationError:
        return WebhookAnswer(400, "the Stripe-Signature header does not verify this body")
    except (ValueError, TypeError, AttributeError, KeyError):  # UnicodeDecodeError is a ValueError
        return WebhookAnswer(400, "the body is not a JSON event")
    # The verified bytes, read as plain JSON: the checks below see exactly what Stripe signed.
    event = json.loads(payload)
    data = event.get("data") if isinstance(event, dict) else None
    session = data.get("object") if isinstance(data, dict) else None
    event_id = _text(event, "id") if isinstance(event, dict) else None
    event_type = _text(event, "type") if isinstance(event, dict) else None
    if event_id is None or event_type is None or not isinstance(session, dict):
        return WebhookAnswer(400, "not a Stripe event (id, type and data.object are required)")
    if event_type not in PAID_EVENTS | UNPAID_EVENTS:
        return WebhookAnswer(200, f"ignored: {event_type[:60]} is not a checkout event")
    try:
        answer = _apply(event_id, event_type, session)
    except _Refuse as refused:
        answer = refused.answer
    log.info("stripe event %s (%s): %s %s", event_id[:80], event_type, answer.status, answer.detail)
    return answer


def session_of(user, pk: int) -> CheckoutSession | None:
    """`user`'s own top-up `pk` (another's is None, like a missing one)."""
    return CheckoutSession.objects.filter(user=user, pk=pk).select_related("credit").first()
