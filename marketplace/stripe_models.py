"""Tables of Stripe Checkout card top-ups: the session a top-up goes through and the webhook
events handled for it. Kept apart from the ledger's tables in marketplace/models.py, which
imports them so that Django finds them under the marketplace app label."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from marketplace.money import format_usd


class CheckoutSession(models.Model):
    """A card top-up through Stripe Checkout (marketplace/stripe_checkout.py). The row is made
    before Stripe is asked for the session (so Stripe's idempotency key and the session's
    metadata can name it), then carries Stripe's session id, unique. The wallet is credited
    only from Stripe's signed `checkout.session.completed` webhook, once: the credit is one
    ledger transaction with the unique once_key "checkout:<id>", and `credit` (unique) points
    at it. States only move forward: open -> paid, or open -> expired (-> paid if Stripe still
    reports the payment; a paid session never moves again)."""

    class State(models.TextChoices):
        CREATING = "creating", "being created at Stripe"
        OPEN = "open", "waiting for payment"
        PAID = "paid", "paid and credited"
        EXPIRED = "expired", "expired unpaid"
        FAILED = "failed", "could not be created at Stripe"

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="checkout_sessions"
    )
    amount = models.BigIntegerField(help_text="micro-USD to credit")
    currency = models.CharField(max_length=3, default="usd")
    # NULL until Stripe answers (NULLs are exempt from the unique index; "" would not be).
    stripe_session_id = models.CharField(max_length=255, null=True, blank=True, unique=True)
    state = models.CharField(max_length=10, choices=State.choices, default=State.CREATING)
    created_at = models.DateTimeField(default=timezone.now)
    completed_at = models.DateTimeField(null=True, blank=True)
    credit = models.OneToOneField(
        "marketplace.LedgerTransaction",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="checkout_session",
    )

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.CheckConstraint(condition=Q(amount__gt=0), name="checkout_positive"),
            models.CheckConstraint(
                condition=Q(state="paid", credit__isnull=False)
                | (~Q(state="paid") & Q(credit__isnull=True)),
                name="checkout_paid_iff_credited",
            ),
        ]

    def __str__(self) -> str:
        return f"checkout {self.pk} of {self.user}: {format_usd(self.amount)} ({self.state})"


class StripeEvent(models.Model):
    """Every verified Stripe webhook event handled, once: the event id is unique, so a replay
    of the same event is recognised and moves nothing (the credit itself is also guarded by
    the session's once_key, for two different events about one session)."""

    event_id = models.CharField(max_length=255, unique=True)
    type = models.CharField(max_length=100)
    session = models.ForeignKey(
        CheckoutSession, null=True, blank=True, on_delete=models.PROTECT, related_name="events"
    )
    outcome = models.CharField(max_length=200)
    received_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-received_at", "-id"]

    def __str__(self) -> str:
        return f"{self.type} {self.event_id}: {self.outcome}"
