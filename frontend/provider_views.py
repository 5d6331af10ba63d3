"""Provider pages: nodes (enrolment tokens and the install line, live status), listings made
from a node's GPUs, and earnings with payout requests.

Login required; a provider sees only their own nodes and listings, anyone else's read as 404.
Every write goes through meshnet and marketplace services. The nodes page follows its nodes
live through /ws/provider/ (frontend.provider_consumers): an event only names a node, and the
page fetches the node's card from `node_card` below, so the one template renders a card
whether the page was loaded or updated.
"""

from __future__ import annotations

import secrets
from decimal import Decimal

from django import forms
from django.conf import settings
from django.contrib import messages
from django.db.models import Count, F, Prefetch, Q, QuerySet, Sum
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from frontend.account_views import buyer_login_required
from frontend.install import gateway_url
from marketplace import idempotency, ledger, payments
from marketplace.errors import MarketError
from marketplace.listings import create_listing, delete_listing, update_listing
from marketplace.models import Listing, Order, PayoutRequest, Settlement
from marketplace.money import format_usd, micro_to_usd, usd_to_micro
from meshnet.enrolment import create_enrollment_token
from meshnet.models import EnrollmentToken, Gpu, Node, Sandbox


def provider_page(view):
    """Provider pages: logged in (this site's login page)."""
    return buyer_login_required(view)


def install_command(request: HttpRequest, token: str) -> str:
    return f"curl -fsSL {gateway_url(request)}/install.sh | sudo sh -s -- --token {token}"


# --- nodes -----------------------------------------------------------------------------------


def nodes_of(user) -> QuerySet[Node]:
    """The user's nodes with what a card shows, in three queries whatever their number: the
    nodes (with their listing count), their GPUs, their live sandboxes, and nothing per node."""
    return (
        Node.objects.owned_by(user)
        .annotate(
            listing_count=Count("listings", filter=Q(listings__deleted_at__isnull=True)),
        )
        .prefetch_related(
            Prefetch("gpus", queryset=Gpu.objects.order_by("index")),
            # The jobs running on each node now: sandboxes still in its desired state.
            Prefetch(
                "sandboxes",
                queryset=Sandbox.objects.filter(removed_revision__isnull=True).order_by(
                    "created_at", "id"
                ),
                to_attr="live_sandboxes",
            ),
        )
        # Revoked nodes last; newest enrolment first among the others.
        .order_by(F("revoked_at").asc(nulls_first=True), "-enrolled_at", "-id")
    )


def own_node(user, pk: int) -> Node:
    return get_object_or_404(nodes_of(user), pk=pk)


def _nodes_context(request: HttpRequest, **extra) -> dict:
    nodes = list(nodes_of(request.user))
    now = timezone.now()
    pending_tokens = list(
        EnrollmentToken.objects.filter(
            owner=request.user, used_at__isnull=True, expires_at__gt=now
        ).order_by("-created_at")[:5]
    )
    return {
        "nodes": nodes,
        "active_count": sum(1 for node in nodes if node.revoked_at is None),
        "online_count": sum(1 for node in nodes if node.online),
        "pending_tokens": pending_tokens,
        "now": now,
        **_live_context(),
        **extra,
    }


def _live_context() -> dict:
    return {
        "offline_after": settings.MOLT_NODE_OFFLINE_AFTER_SECONDS,
        "server_now": int(timezone.now().timestamp()),
    }


@provider_page
@require_GET
def nodes(request: HttpRequest) -> HttpResponse:
    return render(request, "frontend/provider/nodes.html", _nodes_context(request))


@provider_page
@require_POST
def create_token(request: HttpRequest) -> HttpResponse:
    """Create an enrolment token and show its install line, once: the answer to this POST is
    the only place the token is ever shown (only its hash is stored), so it is not a redirect
    and the token never appears in a URL, a session or a log."""
    issued = create_enrollment_token(request.user)
    response = render(
        request,
        "frontend/provider/nodes.html",
        _nodes_context(
            request,
            issued=issued,
            command=install_command(request, issued.token),
            gateway=gateway_url(request),
        ),
    )
    response["Cache-Control"] = "no-store"
    return response


@provider_page
@require_GET
def node_cards(request: HttpRequest) -> HttpResponse:
    """Every card of the nodes page (the page re-syncs with this when its socket opens)."""
    return render(request, "frontend/provider/_node_list.html", _nodes_context(request))


@provider_page
@require_GET
def node_card(request: HttpRequest, pk: int) -> HttpResponse:
    return render(
        request,
        "frontend/provider/_node_card.html",
        {"node": own_node(request.user, pk), "now": timezone.now(), **_live_context()},
    )


# --- listings ------------------------------------------------------------------------------------


class ListingForm(forms.Form):
    gpu_model = forms.ChoiceField(label="GPU model")
    gpu_count = forms.IntegerField(label="GPUs", min_value=1, max_value=1024, initial=1)
    price_per_gpu_hour = forms.DecimalField(
        label="USD per GPU-hour",
        min_value=Decimal(0),
        max_digits=12,
        decimal_places=6,
        help_text="what a buyer pays for one GPU for one hour",
    )
    price_per_gib = forms.DecimalField(
        label="USD per GiB of traffic",
        min_value=Decimal(0),
        max_digits=12,
        decimal_places=6,
        initial=Decimal("0.005"),
        help_text="both directions through the job's tunnel",
    )

    def __init__(self, data=None, *, models: list[tuple[str, str]], node: Node) -> None:
        super().__init__(data)
        self.fields["gpu_model"].choices = models
        add_job_fields(self, node)


def add_job_fields(form: forms.Form, node: Node) -> None:
    """What a job gets: the images (of those the node's agent runs), per-GPU CPU and memory,
    disk, and internet access. marketplace.listings checks them again and names the field."""
    form.fields["images"] = forms.MultipleChoiceField(
        label="images",
        required=False,
        choices=[(image, image) for image in node.images or []],
        widget=forms.CheckboxSelectMultiple,
        initial=list(node.images or []),
        help_text="what buyers may run; the first ticked is the default (none ticked: all of "
        "them). The node's agent reports the images it is configured to run.",
    )
    limits = (
        ("cpus_per_gpu", "CPU cores per GPU", 256, 4),
        ("memory_gb_per_gpu", "GB of memory per GPU", 4096, 16),
        ("disk_gb", "GB of disk per job", 100_000, 50),
    )
    for name, label, high, default in limits:
        # Left empty: the default on a new listing, unchanged on an edit.
        form.fields[name] = forms.IntegerField(
            label=label, min_value=1, max_value=high, initial=default, required=False
        )
    form.fields["egress"] = forms.BooleanField(
        label="jobs may reach the internet",
        required=False,
        initial=True,
        help_text="through NAT behind the node; untick to let a job reach only its buyer",
    )


JOB_FIELDS = ("images", "cpus_per_gpu", "memory_gb_per_gpu", "disk_gb", "egress")


def job_changes(data: dict, node: Node) -> dict:
    """The job fields of a cleaned form as the listing services take them: None keeps the
    default (or the current value); no image ticked offers all the node runs."""
    changes = {name: data[name] for name in JOB_FIELDS}
    changes["images"] = changes["images"] or list(node.images or [])
    return changes


class ListingEditForm(forms.Form):
    gpu_count = forms.IntegerField(label="GPUs", min_value=1, max_value=1024)
    price_per_gpu_hour = ListingForm.base_fields["price_per_gpu_hour"]
    price_per_gib = ListingForm.base_fields["price_per_gib"]

    def __init__(self, data=None, *, node: Node, initial=None) -> None:
        super().__init__(data, initial=initial)
        add_job_fields(self, node)


def gpu_models(node: Node) -> list[dict]:
    """The node's GPU models with how many it has and how many are listed already."""
    listed = dict(
        Listing.objects.visible()
        .filter(node=node)
        .values_list("gpu_model")
        .annotate(n=Sum("gpu_count"))
        .order_by()
    )
    counts: dict[str, list[Gpu]] = {}
    for gpu in node.gpus.all():
        counts.setdefault(gpu.name, []).append(gpu)
    return [
        {
            "name": name,
            "count": len(gpus),
            "listed": listed.get(name, 0),
            "free": max(len(gpus) - listed.get(name, 0), 0),
            "vram_gb": min(gpu.vram_gb for gpu in gpus),
        }
        for name, gpus in sorted(counts.items())
    ]


def _add_market_error(form: forms.Form, exc: MarketError) -> None:
    field = exc.field if exc.field in form.fields else None
    form.add_error(field, str(exc))


@provider_page
@require_http_methods(["GET", "POST"])
def node_detail(request: HttpRequest, pk: int) -> HttpResponse:
    """A node's GPUs and listings, and the form that lists its GPUs."""
    node = own_node(request.user, pk)
    models = gpu_models(node)
    choices = [(m["name"], f"{m['name']} ({m['free']} of {m['count']} unlisted)") for m in models]
    form = ListingForm(request.POST or None, models=choices, node=node)
    if request.method == "POST":
        if node.revoked_at is not None:
            form.add_error(None, "This node was revoked: it cannot be listed.")
        elif form.is_valid():
            data = form.cleaned_data
            try:
                listing = create_listing(
                    request.user,
                    node=node,
                    gpu_model=data["gpu_model"],
                    gpu_count=data["gpu_count"],
                    price_per_gpu_hour=usd_to_micro(data["price_per_gpu_hour"]),
                    price_per_gib=usd_to_micro(data["price_per_gib"]),
                    **job_changes(data, node),
                )
            except MarketError as exc:
                _add_market_error(form, exc)
            else:
                messages.success(
                    request,
                    f"Listed {listing.gpu_count} x {listing.gpu_model} as listing #{listing.pk}.",
                )
                return redirect("frontend:provider_listings")
    listings = Listing.objects.owned_by(request.user).filter(node=node).order_by("id")
    return render(
        request,
        "frontend/provider/node.html",
        {
            "node": node,
            "models": models,
            "form": form,
            "listings": listings,
            "on_detail": True,
            "now": timezone.now(),
            **_live_context(),
        },
    )


def own_listing(user, pk: int) -> Listing:
    return get_object_or_404(Listing.objects.owned_by(user).select_related("node"), pk=pk)


@provider_page
@require_GET
def listings(request: HttpRequest) -> HttpResponse:
    live = Order.objects.live().values("listing").annotate(n=Sum("gpu_count")).order_by()
    in_use = {row["listing"]: row["n"] for row in live.filter(listing__owner=request.user)}
    rows = list(
        Listing.objects.owned_by(request.user)
        .select_related("node")
        .order_by("node__name", "gpu_model", "id")
    )
    for listing in rows:
        listing.gpus_in_use = in_use.get(listing.pk, 0)
    return render(request, "frontend/provider/listings.html", {"listings": rows})


@provider_page
@require_http_methods(["GET", "POST"])
def listing_edit(request: HttpRequest, pk: int) -> HttpResponse:
    listing = own_listing(request.user, pk)
    initial = {
        "gpu_count": listing.gpu_count,
        "price_per_gpu_hour": micro_to_usd(listing.price_per_gpu_hour),
        "price_per_gib": micro_to_usd(listing.price_per_gib),
        **{name: getattr(listing, name) for name in JOB_FIELDS},
    }
    form = ListingEditForm(request.POST or None, initial=initial, node=listing.node)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            update_listing(
                listing,
                gpu_count=data["gpu_count"],
                price_per_gpu_hour=usd_to_micro(data["price_per_gpu_hour"]),
                price_per_gib=usd_to_micro(data["price_per_gib"]),
                **job_changes(data, listing.node),
            )
        except MarketError as exc:
            _add_market_error(form, exc)
        else:
            messages.success(request, f"Listing #{listing.pk} saved.")
            return redirect("frontend:provider_listings")
    if request.method == "GET":
        form = ListingEditForm(initial=initial, node=listing.node)
    in_use = Order.objects.gpus_in_use(listing.pk)
    return render(
        request,
        "frontend/provider/listing_edit.html",
        {"listing": listing, "form": form, "in_use": in_use},
    )


@provider_page
@require_POST
def listing_set_active(request: HttpRequest, pk: int, active: bool) -> HttpResponse:
    listing = own_listing(request.user, pk)
    try:
        update_listing(listing, is_active=active)
    except MarketError as exc:
        messages.error(request, str(exc))
    else:
        verb = "is back on the market" if active else "is paused: no new orders"
        messages.success(request, f"Listing #{listing.pk} {verb}.")
    return redirect("frontend:provider_listings")


@provider_page
@require_POST
def listing_delete(request: HttpRequest, pk: int) -> HttpResponse:
    listing = own_listing(request.user, pk)
    delete_listing(listing)
    messages.success(
        request,
        f"Listing #{listing.pk} deleted. Orders already running on it carry on to their end.",
    )
    return redirect("frontend:provider_listings")


# --- earnings ------------------------------------------------------------------------------------


class PayoutForm(forms.Form):
    amount = forms.DecimalField(
        label="USD to pay out",
        min_value=Decimal("0.01"),
        max_digits=13,
        decimal_places=6,
        help_text="from your available earnings",
    )
    # Names this form: submitting it twice (a double click, the back button) requests once.
    nonce = forms.CharField(widget=forms.HiddenInput, max_length=64)


def _earnings_context(request: HttpRequest, form: PayoutForm) -> dict:
    settlements = Settlement.objects.filter(order__listing__owner=request.user)
    totals = settlements.aggregate(
        earned=Sum("provider_amount"), fees=Sum("fee"), orders=Count("id")
    )
    return {
        "available": ledger.earnings_for(request.user),
        "frozen": ledger.frozen_for(request.user),
        "pending_payouts": ledger.payouts_pending_for(request.user),
        "totals": totals,
        "recent": settlements.select_related("order__listing__node").order_by("-created_at", "-id")[
            :25
        ],
        "payouts": PayoutRequest.objects.filter(provider=request.user).order_by(
            "-requested_at", "-id"
        )[:10],
        "form": form,
    }


def _fresh_payout_form() -> PayoutForm:
    return PayoutForm(initial={"nonce": secrets.token_urlsafe(24)})


@provider_page
@require_GET
def earnings(request: HttpRequest) -> HttpResponse:
    """Available earnings, shares still frozen for the dispute window, payout requests, and
    recent settlements. A GET writes nothing (ledger.*_for only read; no account is created)."""
    return render(
        request, "frontend/provider/earnings.html", _earnings_context(request, _fresh_payout_form())
    )


@provider_page
@require_POST
def request_payout(request: HttpRequest) -> HttpResponse:
    """Ask for a payout of available earnings (marketplace.payments.request_payout: the amount
    is set aside at once for an operator to pay). The form's nonce is its idempotency key
    (marketplace.idempotency.once), so the same form submitted twice requests once."""
    form = PayoutForm(request.POST)
    if form.is_valid():
        amount = usd_to_micro(form.cleaned_data["amount"])
        try:
            with idempotency.once(
                request.user,
                f"page:payout:{form.cleaned_data['nonce']}",
                what=f"payout of {format_usd(amount, exact=True)} requested",
            ):
                payout = payments.request_payout(request.user, amount)
        except idempotency.AlreadyDone:
            messages.warning(request, "That payout was already requested.")
            return redirect("frontend:provider_earnings")
        except MarketError as exc:
            _add_market_error(form, exc)
        else:
            messages.success(
                request,
                f"Payout #{payout.pk} requested: an operator pays it out and marks it paid.",
            )
            return redirect("frontend:provider_earnings")
    return render(request, "frontend/provider/earnings.html", _earnings_context(request, form))
