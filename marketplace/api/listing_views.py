"""Market API: listings, read by anyone with a keyset cursor, changed only by their owner.

Views are thin: serializers check shape and type; marketplace.listings applies the rules and
writes. Listings are public offers to read, but only their owner may change them (404 for
others).
"""

from __future__ import annotations

from django import forms
from django.conf import settings
from django.db.models import Q
from django_filters import rest_framework as filters
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    extend_schema,
    extend_schema_field,
)
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.generics import get_object_or_404
from rest_framework.pagination import BasePagination
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.utils.urls import replace_query_param

from marketplace import market
from marketplace.api.schema import error_responses  # also registers the token scheme
from marketplace.api.serializers import (
    ListingCreateSerializer,
    ListingSerializer,
    ListingUpdateSerializer,
    QuoteRequestSerializer,
    QuoteSerializer,
)
from marketplace.listings import create_listing, delete_listing, update_listing
from marketplace.models import Listing, Order
from marketplace.money import format_usd
from marketplace.orders import quote_for


class IntegerFilter(filters.NumberFilter):
    # Amounts, GiB and counts are integers: "1.5" is an error, not a silent rounding.
    field_class = forms.IntegerField


API_SORTS = [name for name in market.SORTS if name != "-gpus_free"]


def _text(description: str) -> dict[str, object]:
    # A text filter's schema says what the API does with an empty value: refuses it
    # (ListingViewSet.list), so it is not a valid value for the schema either.
    return {"type": "string", "minLength": 1, "description": description}


class ListingFilter(filters.FilterSet):
    gpu_model = extend_schema_field(_text("exact model, any case"))(
        filters.CharFilter(lookup_expr="iexact")
    )
    min_vram_gb = IntegerFilter(field_name="vram_gb", lookup_expr="gte")
    max_price = IntegerFilter(
        field_name="price_per_gpu_hour", lookup_expr="lte", help_text="micro-USD per GPU-hour"
    )
    region = extend_schema_field(_text("region, exact"))(filters.CharFilter(field_name="region"))
    min_gpus = IntegerFilter(field_name="gpu_count", lookup_expr="gte")
    min_reliability = IntegerFilter(
        field_name="node__reliability__score",
        lookup_expr="gte",
        help_text="0 to 100; listings whose node has no score yet are left out",
    )
    min_driver_version = extend_schema_field(
        _text("NVIDIA driver at least this, e.g. 535.104 (every GPU of the listing)")
    )(filters.CharFilter(method="filter_min_version"))
    min_cuda_version = extend_schema_field(_text("CUDA at least this, e.g. 12.2"))(
        filters.CharFilter(method="filter_min_version")
    )
    # Applied by ListingPagination (a keyset page needs the order); declared here so that a
    # bad value is a 400 naming it and the schema lists the choices.
    ordering = filters.ChoiceFilter(
        choices=[(name, name) for name in API_SORTS],
        method="keep",
        help_text="default price_per_gpu_hour; reliability sorts nodes without a score last",
    )

    class Meta:
        model = Listing
        fields = ["gpu_model", "min_vram_gb", "max_price", "region", "min_gpus", "min_reliability"]

    def filter_min_version(self, queryset, name, value):  # type: ignore[no-untyped-def]
        try:
            key = market.parse_min_version(name, value)
        except market.BadQuery as exc:
            raise ValidationError({exc.field: [str(exc)]}) from None
        if name == "min_driver_version":
            return market.with_min_versions(queryset, driver=key)
        return market.with_min_versions(queryset, cuda=key)

    def keep(self, queryset, name, value):  # type: ignore[no-untyped-def]
        return queryset


FILTER_NAMES = frozenset(ListingFilter.base_filters) - {"ordering"}
# Every query parameter of GET listings/. The API refuses an empty one (`?max_price=`) with a
# 400 naming it rather than reading it as absent: a client that sends a parameter means a
# value, and the schema's types (an integer, a boolean, an ordering, a non-empty string) have
# no empty value. (The marketplace page, frontend.views, has its own form: there an empty
# field of the submitted filter form is no filter.)
LIST_PARAMETERS = FILTER_NAMES | {"ordering", "mine", "include_offline", "limit", "cursor"}


def _refuse_empty(request: Request) -> None:
    empty = sorted(
        name
        for name in LIST_PARAMETERS
        if any(value == "" for value in request.query_params.getlist(name))
    )
    if empty:
        raise ValidationError(
            {name: ["must not be empty: leave the parameter out instead"] for name in empty}
        )


MINE_PARAMETER = OpenApiParameter(
    name="mine",
    type=OpenApiTypes.BOOL,
    location=OpenApiParameter.QUERY,
    required=False,
    description="true: your own listings, paused ones included, instead of the market's offers",
)
INCLUDE_OFFLINE_PARAMETER = OpenApiParameter(
    name="include_offline",
    type=OpenApiTypes.BOOL,
    location=OpenApiParameter.QUERY,
    required=False,
    description="true: also listings of offline nodes (no heartbeat within 45 s), each with "
    "online=false; by default they are hidden",
)


def _flag(request: Request, name: str) -> bool:
    raw = request.query_params.get(name, "").lower()
    if raw in {"", "0", "false", "no"}:
        return False
    if raw in {"1", "true", "yes"}:
        return True
    raise ValidationError({name: ["must be true or false"]})


class ListingPagination(BasePagination):
    """Keyset pages (marketplace.market): `?cursor=` from a page's `next` or `previous`, and
    `?limit=` (50 by default, at most 200). Every page costs one query, however deep; there is
    no total count (that would read every row) and no offset."""

    default_limit = 50
    max_limit = 200

    def paginate_queryset(self, queryset, request, view=None):  # type: ignore[no-untyped-def]
        if "offset" in request.query_params:
            raise ValidationError(
                {"offset": ["listings are paged with cursor: follow a page's next link"]}
            )
        self.request = request
        raw = request.query_params.get("limit")
        if raw is not None and not (raw.isascii() and raw.isdigit() and int(raw[:7]) >= 1):
            raise ValidationError(
                {"limit": [f"must be a whole number, at least 1 (above {self.max_limit} capped)"]}
            )
        # Huge values are capped, not refused, as before; thousands of digits are never parsed.
        size = self.default_limit if raw is None else min(int(raw[:7]), self.max_limit)
        self.sort = request.query_params.get("ordering") or market.DEFAULT_SORT
        if self.sort not in API_SORTS:
            raise ValidationError({"ordering": [f"must be one of {', '.join(API_SORTS)}"]})
        token = request.query_params.get("cursor")
        try:
            cursor = market.Cursor.decode(token, self.sort) if token else None
        except market.BadQuery as exc:
            raise ValidationError({exc.field: [str(exc)]}) from None
        self.page = market.page(queryset, self.sort, cursor, size)
        return market.api_rows(self.page.rows)

    def _link(self, cursor: market.Cursor | None) -> str | None:
        if cursor is None:
            return None
        url = self.request.build_absolute_uri()
        return replace_query_param(url, "cursor", cursor.encode())

    def get_paginated_response(self, data):  # type: ignore[no-untyped-def]
        return Response(
            {
                "next": self._link(self.page.next),
                "previous": self._link(self.page.previous),
                "results": data,
            }
        )

    def get_paginated_response_schema(self, schema):  # type: ignore[no-untyped-def]
        link = {"type": "string", "nullable": True, "format": "uri"}
        return {
            "type": "object",
            "required": ["next", "previous", "results"],
            "properties": {"next": link, "previous": link, "results": schema},
        }

    def get_schema_operation_parameters(self, view):  # type: ignore[no-untyped-def]
        return [
            {
                "name": "cursor",
                "required": False,
                "in": "query",
                "description": "a page's position, from the previous page's next or previous",
                "schema": {"type": "string", "minLength": 1},
            },
            {
                "name": "limit",
                "required": False,
                "in": "query",
                # No `maximum`: a larger limit is capped, not refused (docs/api.md), so the
                # schema may not call it invalid.
                "description": f"rows per page, at least 1 (default {self.default_limit}); "
                f"more than {self.max_limit} is capped at {self.max_limit}",
                "schema": {"type": "integer", "minimum": 1},
            },
        ]


class ListingViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    queryset = Listing.objects.none()  # for the schema generator; see get_queryset
    serializer_class = ListingSerializer
    filterset_class = ListingFilter
    filter_backends = [filters.DjangoFilterBackend]
    pagination_class = ListingPagination
    http_method_names = ["get", "post", "patch", "delete", "head", "options"]

    def get_queryset(self):
        user = self.request.user
        if self.request.method in ("GET", "HEAD", "OPTIONS"):
            if self.action == "list":
                # One query per page (marketplace.market): rows, not model instances.
                mine = _flag(self.request, "mine")
                base = Listing.objects.owned_by(user) if mine else None
                offline = mine or _flag(self.request, "include_offline")
                return market.offers(base, include_offline=offline)
            # An active listing is a public offer anyone may read; an owner also sees their
            # own paused ones. Deleted ones are gone for everybody.
            listings = Listing.objects.visible().filter(
                Q(is_active=True, node__revoked_at__isnull=True) | Q(owner=user)
            )
        else:
            # Changes only through the owner's own listings: anybody else gets a 404.
            listings = Listing.objects.owned_by(user)
        return market.offers(listings, include_offline=True).select_related(
            "node__reliability", "owner"
        )

    @extend_schema(parameters=[MINE_PARAMETER, INCLUDE_OFFLINE_PARAMETER])
    def list(self, request: Request, *args, **kwargs) -> Response:
        _refuse_empty(request)
        queryset = self.get_queryset()
        # A FilterSet (its form, its validation) costs about as much as the page's query:
        # build it only when a filter is given. `ordering` alone is checked by the pagination.
        if any(name in request.query_params for name in FILTER_NAMES):
            queryset = self.filter_queryset(queryset)
        rows = self.paginate_queryset(queryset)
        return self.get_paginated_response(rows)

    @extend_schema(
        request=ListingCreateSerializer,
        responses={
            201: ListingSerializer,
            **error_responses({400: "invalid input, naming the field"}),
        },
        summary="List GPUs of one of your nodes for rent",
    )
    def create(self, request: Request) -> Response:
        form = ListingCreateSerializer(data=request.data, context=self.get_serializer_context())
        form.is_valid(raise_exception=True)
        listing = create_listing(request.user, **form.validated_data)
        return Response(self.get_serializer(listing).data, status=status.HTTP_201_CREATED)

    @extend_schema(
        request=ListingUpdateSerializer,
        responses={
            200: ListingSerializer,
            **error_responses(
                {
                    400: "invalid input, naming the field",
                    404: "no such listing of yours",
                    409: "gpu_count below the GPUs live orders use",
                }
            ),
        },
        summary="Change prices, GPU count, or pause (is_active=false) your listing",
    )
    def partial_update(self, request: Request, pk: str | None = None) -> Response:
        listing = self.get_object()
        changes = ListingUpdateSerializer(data=request.data)
        changes.is_valid(raise_exception=True)
        listing = update_listing(listing, **changes.validated_data)
        return Response(self.get_serializer(listing).data)

    @extend_schema(
        responses={204: None, **error_responses({404: "no such listing of yours"})},
        summary="Withdraw your listing (placed orders keep running)",
    )
    def destroy(self, request: Request, *args, **kwargs) -> Response:
        return super().destroy(request, *args, **kwargs)

    def perform_destroy(self, instance: Listing) -> None:
        delete_listing(instance)

    @extend_schema(
        parameters=[QuoteRequestSerializer],
        responses={
            200: QuoteSerializer,
            **error_responses(
                {
                    400: "hours or gpu_count missing or out of range, naming the field",
                    404: "no such listing on offer",
                }
            ),
        },
        summary="The all-in price of an order of this listing (nothing is held)",
    )
    @action(detail=True, methods=["get"], permission_classes=[AllowAny])
    def quote(self, request: Request, pk: str | None = None) -> Response:
        # Anyone may price an offer, signed in or not: only listings on offer are quoted.
        listing = get_object_or_404(Listing.objects.available(), pk=pk)
        params = QuoteRequestSerializer(data=request.query_params)
        params.is_valid(raise_exception=True)
        hours, gpu_count = params.validated_data["hours"], params.validated_data["gpu_count"]
        if hours > settings.MOLT_MAX_ORDER_HOURS:
            raise ValidationError(
                {"hours": [f"hours must be between 1 and {settings.MOLT_MAX_ORDER_HOURS}"]}
            )
        if gpu_count > listing.gpu_count:
            raise ValidationError({"gpu_count": [f"this listing has {listing.gpu_count} GPU(s)"]})
        q = quote_for(listing, gpu_count=gpu_count, hours=hours)
        data = {
            "listing": listing.pk,
            "hours": hours,
            "gpu_count": gpu_count,
            "gpus_available": max(listing.gpu_count - Order.objects.gpus_in_use(listing.pk), 0),
            "time_charge": q.time_charge,
            "bandwidth_allowance_bytes": q.bandwidth_allowance_bytes,
            "bandwidth_allowance_charge": q.bandwidth_allowance_charge,
            "fee": q.fee,
            "total_hold": q.total_hold,
            "currency": settings.MOLT_CURRENCY,
            "unit": settings.MOLT_CURRENCY_UNIT,
        }
        data["display"] = {
            name: format_usd(data[name])
            for name in ("time_charge", "bandwidth_allowance_charge", "fee", "total_hold")
        }
        return Response(QuoteSerializer(data).data)
