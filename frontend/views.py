"""Browser pages. Read-only here: every write goes through marketplace and meshnet services."""

from __future__ import annotations

from decimal import Decimal

import redis
from django import forms
from django.conf import settings
from django.db import DatabaseError, connection
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from marketplace import market
from marketplace.models import Listing
from marketplace.money import usd_to_micro
from meshnet.ipplan import REGIONS
from meshnet.versions import version_key

PAGE_SIZE = 25

# The page's sorts, as marketplace.market.SORTS names them.
SORTS = {
    "price": "price_per_gpu_hour",
    "-price": "-price_per_gpu_hour",
    "-vram": "-vram_gb",
    "-free": "-gpus_free",
    "-reliability": "-reliability",
}
SORT_CHOICES = [
    ("price", "cheapest first"),
    ("-price", "priciest first"),
    ("-vram", "most VRAM first"),
    ("-free", "most free GPUs first"),
    ("-reliability", "most reliable first"),
]


def _version_field(label: str, example: str) -> forms.CharField:
    return forms.CharField(
        required=False,
        max_length=20,
        label=label,
        validators=[_check_version],
        widget=forms.TextInput(attrs={"placeholder": example, "inputmode": "decimal"}),
    )


def _check_version(value: str) -> None:
    if value and version_key(value) is None:
        raise forms.ValidationError("a version such as 535.104 or 12.2")


class ListingFilterForm(forms.Form):
    """The filters of the marketplace page, read from the query string. A field with a bad
    value is reported on the page and ignored; the other filters still apply."""

    gpu_model = forms.ChoiceField(required=False, label="GPU model")
    min_vram_gb = forms.IntegerField(
        required=False, min_value=0, max_value=100_000, label="min VRAM (GB)"
    )
    max_price = forms.DecimalField(
        required=False,
        min_value=Decimal(0),
        max_digits=12,
        decimal_places=6,
        label="max USD per GPU-hour",
    )
    max_price_per_gib = forms.DecimalField(
        required=False,
        min_value=Decimal(0),
        max_digits=12,
        decimal_places=6,
        label="max USD per GiB",
    )
    region = forms.ChoiceField(
        required=False, choices=[("", "any region"), *((r, r) for r in REGIONS)], label="region"
    )
    min_reliability = forms.IntegerField(
        required=False, min_value=0, max_value=100, label="min reliability (0-100)"
    )
    min_gpus = forms.IntegerField(
        required=False, min_value=1, max_value=1024, label="min free GPUs"
    )
    min_driver_version = _version_field("min driver version", "535.104")
    min_cuda_version = _version_field("min CUDA version", "12.2")
    show_offline = forms.BooleanField(required=False, label="show offline nodes")
    sort = forms.ChoiceField(required=False, choices=SORT_CHOICES, label="sort by")

    def __init__(self, data, *, gpu_models: list[str]) -> None:
        super().__init__(data)
        self.fields["gpu_model"].choices = [("", "any model"), *((m, m) for m in gpu_models)]

    def value(self, name: str):
        """The cleaned value of `name`, or None when it was empty or invalid."""
        if name in self.errors:
            return None
        return self.cleaned_data.get(name) or None


def listings_with_free_gpus() -> QuerySet[Listing]:
    """Available listings, offline nodes' included, with `gpus_free` (the listing's GPUs less
    those held by live orders) and node, owner and reliability joined: one query per listing
    page (frontend.buyer_views.listing_detail)."""
    return market.offers(include_offline=True).select_related("node", "node__reliability", "owner")


def filter_listings(listings: QuerySet[Listing], form: ListingFilterForm) -> QuerySet[Listing]:
    """`listings` (from marketplace.market.offers) narrowed by the form's valid filters."""
    if model := form.value("gpu_model"):
        listings = listings.filter(gpu_model=model)
    if (vram := form.value("min_vram_gb")) is not None:
        listings = listings.filter(vram_gb__gte=vram)
    max_price = None if "max_price" in form.errors else form.cleaned_data.get("max_price")
    if max_price is not None:
        # decimal_places=6 makes this exact: the form refuses anything finer than a micro-USD.
        listings = listings.filter(price_per_gpu_hour__lte=usd_to_micro(max_price))
    max_gib = (
        None if "max_price_per_gib" in form.errors else form.cleaned_data.get("max_price_per_gib")
    )
    if max_gib is not None:
        listings = listings.filter(price_per_gib__lte=usd_to_micro(max_gib))
    if region := form.value("region"):
        listings = listings.filter(region=region)
    if (reliability := form.value("min_reliability")) is not None:
        # A node without a score yet (no finished job) does not pass a reliability filter.
        listings = listings.filter(node__reliability__score__gte=reliability)
    if (gpus := form.value("min_gpus")) is not None:
        listings = listings.filter(gpus_free__gte=gpus)
    return market.with_min_versions(
        listings,
        driver=version_key(form.value("min_driver_version")),
        cuda=version_key(form.value("min_cuda_version")),
    )


@require_GET
def marketplace(request: HttpRequest) -> HttpResponse:
    gpu_models = list(
        Listing.objects.available()
        .order_by("gpu_model")
        .values_list("gpu_model", flat=True)
        .distinct()
    )
    form = ListingFilterForm(request.GET, gpu_models=gpu_models)
    form.is_valid()  # errors are shown beside their fields; valid filters still apply
    listings = filter_listings(
        market.offers(include_offline=bool(form.value("show_offline"))), form
    )
    sort = SORTS[form.value("sort") or "price"]
    try:
        token = request.GET.get("cursor")
        cursor = market.Cursor.decode(token, sort) if token else None
    except market.BadQuery:
        cursor = None  # a stale or edited link: the first page
    page = market.page(listings, sort, cursor, PAGE_SIZE)
    count, capped = market.bounded_count(listings)
    filtered = any(request.GET.get(name) for name in form.fields if name not in ("sort",))
    return render(
        request,
        "frontend/marketplace.html",
        {
            "form": form,
            "listings": page.rows,
            "next_cursor": page.next.encode() if page.next else None,
            "previous_cursor": page.previous.encode() if page.previous else None,
            "count": count,
            "count_capped": capped,
            "filtered": filtered,
            "regions": REGIONS,
            "offline_cutoff": market.offline_cutoff(),
        },
    )


def healthz(request):
    return HttpResponse("ok", content_type="text/plain")


def _database_ready() -> str:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return "ok"
    except DatabaseError as exc:
        return f"unreachable: {type(exc).__name__}"


def _redis_ready(url: str) -> str:
    """PING the Redis at `url` with a short timeout (the broker and the channel layer)."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return "ok (not Redis)"  # memory:// in tests, another broker elsewhere
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        try:
            client.ping()
        finally:
            client.close()
        return "ok"
    except redis.RedisError as exc:
        return f"unreachable: {type(exc).__name__}"


@require_GET
def readyz(request):
    """Whether this gateway can do its work now, not only serve pages: its database and its
    broker (Redis: Celery's queue and the agents' channel layer). 503 naming what is down, so a
    load balancer stops sending writes that would commit and then find no broker (healthz only
    says the process is up)."""
    checks = {
        "database": _database_ready(),
        "broker": _redis_ready(settings.CELERY_BROKER_URL),
    }
    ready = all(value.startswith("ok") for value in checks.values())
    return JsonResponse({"ready": ready, **checks}, status=200 if ready else 503)
