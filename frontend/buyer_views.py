"""Buyer pages: a listing with its quote, the buyer's orders, one order live, and the wallet.

Orders are placed, stopped and re-keyed by the page's script through the REST API
(session auth + CSRF), because the WireGuard key pair is made in the browser and only its
public key may reach the server. Another buyer's order is a 404, like a missing one. The one
form posted here is the wallet's "Pay with card", which only starts a Stripe Checkout session
(marketplace/stripe_checkout.py; the wallet is credited by Stripe's webhook, never here)."""

from __future__ import annotations

from django import forms
from django.conf import settings
from django.core.paginator import Paginator
from django.db.models import F, Q, Sum, Window
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from frontend import card_views
from frontend.account_views import buyer_login_required
from frontend.charts import line_chart
from frontend.order_state import STEPS, order_for, snapshot, usage_intervals
from frontend.views import PAGE_SIZE, listings_with_free_gpus
from marketplace import ledger, payments, stripe_checkout
from marketplace.connect import connect_info, sandbox_of
from marketplace.errors import MarketError
from marketplace.models import (
    Account,
    Dispute,
    EarningsHold,
    EscrowHold,
    LedgerEntry,
    Order,
    SshKey,
)
from marketplace.money import usd_to_micro
from marketplace.orders import quote_for
from marketplace.settlement import cost_rate_per_hour, cost_so_far


class QuoteForm(forms.Form):
    """Hours and GPUs of the order being priced; the page's script re-prices as they change."""

    def __init__(self, data, *, max_gpus: int) -> None:
        super().__init__(data)
        self.fields["hours"] = forms.IntegerField(
            min_value=1, max_value=settings.MOLT_MAX_ORDER_HOURS, label="Hours"
        )
        self.fields["gpu_count"] = forms.IntegerField(
            min_value=1, max_value=max(max_gpus, 1), label="GPUs"
        )


@require_GET
def listing_detail(request: HttpRequest, pk: int) -> HttpResponse:
    listing = listings_with_free_gpus().filter(pk=pk).first()
    if listing is None:
        raise Http404("no such listing on offer")
    data = request.GET if {"hours", "gpu_count"} & set(request.GET) else {}
    form = QuoteForm(data or {"hours": 1, "gpu_count": 1}, max_gpus=listing.gpus_free)
    quote = None
    if form.is_valid():
        quote = quote_for(
            listing, gpu_count=form.cleaned_data["gpu_count"], hours=form.cleaned_data["hours"]
        )
    gpus = [gpu for gpu in listing.node.gpus.all() if gpu.name == listing.gpu_model]
    available = ledger.available_for(request.user) if request.user.is_authenticated else None
    return render(
        request,
        "frontend/listing.html",
        {
            "listing": listing,
            "form": form,
            "quote": quote,
            "gpus": gpus,
            "available": available,
            "allowance_gib": settings.MOLT_BANDWIDTH_ALLOWANCE_GIB,
            "fee_percent": settings.MOLT_PLATFORM_FEE_BPS / 100,
            "own": request.user.is_authenticated and listing.owner_id == request.user.pk,
            # An order's sandbox takes the buyer's SSH keys: without one, nobody could log in.
            # A listing without images runs no sandbox, and orders need no key (as the API).
            "has_ssh_keys": request.user.is_authenticated
            and SshKey.objects.filter(user=request.user).exists(),
        },
    )


@buyer_login_required
@require_GET
def order_list(request: HttpRequest) -> HttpResponse:
    orders = Order.objects.for_buyer(request.user).select_related(
        "listing", "settlement", "dispute"
    )
    page = Paginator(orders, PAGE_SIZE).get_page(request.GET.get("page"))
    return render(request, "frontend/orders.html", {"page": page})


# The reason box takes what the API takes.
DISPUTE_REASON_MAX_LENGTH = Dispute._meta.get_field("reason").max_length

# A disputed or resolved order went through every step first.
_AFTER_COMPLETION = (Order.State.DISPUTED, Order.State.RESOLVED)


def _dispute_context(order: Order, settlement) -> dict:
    """The order page's dispute panel: the buyer's dispute and its outcome, or whether (and
    until when) the order can still be disputed. At most one query, and none for an order that
    was never settled. The form is offered on the rule payments.open_dispute applies
    (payments.why_not_disputable), so it shows only when the API would accept it (the API
    still decides: a page left open past the window gets its 409)."""
    if order.state in _AFTER_COMPLETION:
        dispute = Dispute.objects.filter(order=order).first()
        refunded = dispute.refund if dispute is not None and dispute.refund is not None else 0
        return {
            "dispute": dispute,
            "refunded": refunded,
            "net_paid": settlement.captured - refunded if settlement is not None else 0,
        }
    share = None
    if settlement is not None and settlement.captured > 0:
        share = EarningsHold.objects.filter(order=order).only("state", "release_after").first()
    can_dispute = payments.why_not_disputable(order, share, timezone.now()) is None
    return {
        "dispute": None,
        "can_dispute": can_dispute,
        "dispute_window_ends_at": share.release_after if share is not None else None,
    }


def allowance_percent(used: int, allowance: int) -> str:
    """How much of the bandwidth allowance is used, with the precision that shows small use:
    103 MiB of 50 GiB is `0.20`, not `0`; 0 only when nothing moved. At most `100`."""
    if used <= 0 or allowance <= 0:
        return "100" if used > 0 else "0"
    share = min(used / allowance * 100, 100.0)
    if share >= 10:
        return f"{share:.0f}"
    if share >= 1:
        return f"{share:.1f}"
    return f"{max(share, 0.01):.2f}"


def _order_context(order: Order) -> dict:
    points = usage_intervals(order)
    used = order.bytes_in + order.bytes_out
    sandbox = sandbox_of(order.pk)
    state = snapshot(order, sandbox)
    current = STEPS[-1] if order.state in _AFTER_COMPLETION else order.state
    reached = STEPS.index(current) if current in STEPS else -1
    settlement = getattr(order, "settlement", None)
    return {
        "order": order,
        "state": state,
        "steps": [(step, i < reached, i == reached) for i, step in enumerate(STEPS)],
        "transitions": order.transitions.all(),
        "chart": line_chart(points, width=640, height=160),
        "intervals": len(points),
        "settlement": settlement,
        "allowance_used": used,
        "allowance_used_percent": allowance_percent(used, order.bandwidth_allowance_bytes),
        "allowance_high": order.bandwidth_allowance_bytes * 8 // 10,
        "cost_so_far": cost_so_far(order),
        "cost_rate_per_hour": cost_rate_per_hour(order),
        "dispute_max_length": DISPUTE_REASON_MAX_LENGTH,
        "sandbox": connect_info(sandbox),
        # Once the order stops, the node removes the container first: no login to offer.
        "sandbox_gone": sandbox is not None
        and (
            sandbox.removed_revision is not None
            or order.state in Order.ENDED_STATES
            or order.state == Order.State.STOPPING
        ),
        **_dispute_context(order, settlement),
    }


@buyer_login_required
@require_GET
def order_detail(request: HttpRequest, pk: int) -> HttpResponse:
    order = order_for(request.user, pk)
    if order is None:
        raise Http404("no such order of yours")
    return render(request, "frontend/order.html", _order_context(order))


@buyer_login_required
@require_GET
def order_panels(request: HttpRequest, pk: int) -> HttpResponse:
    """The order page's server-rendered live panels (usage, receipt, history), fetched by its
    script when the websocket says the order changed, so amounts and dates are formatted in
    one place."""
    order = order_for(request.user, pk)
    if order is None:
        raise Http404("no such order of yours")
    return render(request, "frontend/order_panels.html", _order_context(order))


@buyer_login_required
@require_GET
def wallet(request: HttpRequest) -> HttpResponse:
    return render_wallet(request)


def render_wallet(request: HttpRequest, *, card_form=None, status: int = 200) -> HttpResponse:
    """The wallet page; `card_form` is a refused card top-up form to show with its errors
    (frontend.card_views)."""
    account = Account.objects.filter(kind=Account.Kind.WALLET, user=request.user).first()
    entries = LedgerEntry.objects.none()
    if account is not None:
        # The balance after each entry, computed in the same query; entries are appended in
        # id order, so that order is the wallet's history.
        entries = (
            LedgerEntry.objects.filter(account=account)
            .select_related("transaction")
            .annotate(balance_after=Window(Sum("amount"), order_by=F("id").asc()))
            .order_by("-id")
        )
    page = Paginator(entries, PAGE_SIZE).get_page(request.GET.get("page"))
    # Only what the list shows: a buyer with many live orders has a hold each. The total held
    # is summed from the same rows, so it always matches the list (and costs no query).
    # A multi-node order's one hold (cluster) counts what its escrow still holds: its amount
    # less what its ended parts captured already.
    holds = list(
        EscrowHold.objects.filter(
            Q(order__buyer=request.user) | Q(cluster__buyer=request.user),
            state=EscrowHold.State.OPEN,
        )
        .select_related("order__listing", "account")
        .only("amount", "cluster_id", "order__listing__gpu_model", "account__balance")
        .order_by("-id")
    )
    response = render(
        request,
        "frontend/wallet.html",
        {
            "available": account.balance if account is not None else 0,
            "held": sum(hold.account.balance for hold in holds),
            "currency": settings.MOLT_CURRENCY,
            "page": page,
            "holds": holds,
            **card_views.wallet_card_context(request, card_form),
        },
        status=status,
    )
    card_views.allow_checkout_form(response)
    return response


@buyer_login_required
@require_POST
def card_top_up(request: HttpRequest) -> HttpResponse:
    """Start a Stripe Checkout session for the amount and send the browser to Stripe's page;
    a refused amount (or card payments off, or Stripe unreachable) re-renders the wallet."""
    form = card_views.CardTopUpForm(request.POST)
    if not stripe_checkout.enabled():
        form.add_error(None, "Card payments are not configured on this marketplace.")
        return render_wallet(request, card_form=form, status=404)
    if not form.is_valid():
        return render_wallet(request, card_form=form, status=400)
    amount = usd_to_micro(form.cleaned_data["amount"])

    def return_urls(pk: int) -> tuple[str, str]:
        page = request.build_absolute_uri(reverse("frontend:card_top_up_status", args=[pk]))
        return page, f"{page}?cancelled=1"

    try:
        url = stripe_checkout.start_checkout(request.user, amount, return_urls=return_urls)
    except MarketError as refused:
        form.add_error(None, str(refused))
        return render_wallet(request, card_form=form, status=refused.status_code)
    return HttpResponseRedirect(url)
