"""Card top-ups on the wallet page (marketplace/stripe_checkout.py does the work): the form,
the wallet page's part, and the top-up's own page. The form's POST view is
frontend.buyer_views.card_top_up, beside the wallet page it re-renders on errors.

"Pay with card" posts an amount; we start a Stripe Checkout session and redirect the
browser to Stripe's hosted page. Stripe sends the buyer back to the top-up's own page, which
says what happened: credited, or still waiting for Stripe's confirmation (the webhook), or
cancelled. The return itself credits nothing."""

from __future__ import annotations

from decimal import Decimal

from django import forms
from django.conf import settings
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from frontend.account_views import buyer_login_required
from frontend.security import POLICY
from marketplace import stripe_checkout
from marketplace.models import CheckoutSession

RECENT = 5


class CardTopUpForm(forms.Form):
    amount = forms.DecimalField(
        label="Amount (USD)",
        decimal_places=2,
        max_digits=12,
        help_text="Whole dollars and cents.",
    )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        low, high = settings.MOLT_CARD_TOP_UP_MIN_USD, settings.MOLT_CARD_TOP_UP_MAX_USD
        field = self.fields["amount"]
        field.validators.append(_between(low, high))
        field.widget.attrs.update({"min": low, "max": high, "step": "0.01", "inputmode": "decimal"})
        field.help_text = f"Between ${low:,} and ${high:,}, paid by card through Stripe."


def _between(low: int, high: int):
    def check(value: Decimal) -> None:
        if not Decimal(low) <= value <= Decimal(high):
            raise forms.ValidationError(f"A card top-up is between ${low:,} and ${high:,}.")

    return check


def wallet_card_context(request: HttpRequest, form: CardTopUpForm | None) -> dict:
    """What the wallet page's card section needs: whether card payments are on, the form, and
    the buyer's latest card top-ups (a pending one says so)."""
    return {
        "card_enabled": stripe_checkout.enabled(),
        "card_form": form or CardTopUpForm(initial={"amount": 20}),
        "card_top_ups": list(
            CheckoutSession.objects.filter(user=request.user)
            .exclude(state__in=[CheckoutSession.State.CREATING, CheckoutSession.State.FAILED])
            .only("amount", "state", "created_at")[:RECENT]
        ),
    }


def allow_checkout_form(response: HttpResponse) -> None:
    """The wallet page's form is redirected to Stripe's hosted checkout page, and browsers hold
    a form's redirects to form-action too: allow that one origin on this page only."""
    if stripe_checkout.enabled():
        response["Content-Security-Policy"] = POLICY.replace(
            "form-action 'self'", f"form-action 'self' {settings.STRIPE_CHECKOUT_ORIGIN}"
        )


@buyer_login_required
@require_GET
def card_top_up_status(request: HttpRequest, pk: int) -> HttpResponse:
    row = stripe_checkout.session_of(request.user, pk)
    if row is None:
        raise Http404("no such card top-up of yours")
    cancelled = "cancelled" in request.GET and row.state != CheckoutSession.State.PAID
    return render(
        request,
        "frontend/card_top_up.html",
        {
            "top_up": row,
            "cancelled": cancelled,
            "pending": row.state == CheckoutSession.State.OPEN and not cancelled,
        },
    )
