"""Card top-ups through Stripe Checkout in the admin, read-only: the sessions buyers started and
the Stripe events the webhook handled (marketplace/stripe_checkout.py). Nothing here credits:
only Stripe's signed webhook does; an operator's own credit is the grant action on users."""

from __future__ import annotations

from django.contrib import admin

from marketplace.admin.common import money
from marketplace.models import CheckoutSession, StripeEvent
from meshnet.admin import ReadOnlyAdmin


@admin.register(CheckoutSession)
class CheckoutSessionAdmin(ReadOnlyAdmin):
    list_display = ("id", "user", "shown_amount", "state", "created_at", "completed_at", "credit")
    list_filter = ("state",)
    list_select_related = ("user", "credit")
    search_fields = ("=id", "user__username", "=stripe_session_id")
    date_hierarchy = "created_at"
    shown_amount = money("amount", "amount")


@admin.register(StripeEvent)
class StripeEventAdmin(ReadOnlyAdmin):
    list_display = ("event_id", "type", "session", "outcome", "received_at")
    list_filter = ("type",)
    list_select_related = ("session",)
    search_fields = ("=event_id", "=session__id", "=session__stripe_session_id")
