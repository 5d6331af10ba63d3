"""Market API: API tokens, listings, orders (with their WireGuard config) and the wallet.

Views are thin: serializers check shape and type; marketplace's write paths (orders, listings,
tokens, payments) apply the rules and writes (one transaction each). Another user's orders,
nodes and wallet are invisible (404); listings are public offers to read, but only their owner
may change them (404 for others).
"""

from __future__ import annotations

from django import forms
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db.models import OuterRef, Q, Subquery, Sum
from django.db.models.functions import Coalesce
from django.http import HttpResponse
from django_filters import rest_framework as filters
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import APIException, PermissionDenied, ValidationError
from rest_framework.generics import get_object_or_404
from rest_framework.permissions import AllowAny
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from marketplace import ledger, payments
from marketplace.api.idempotency import IDEMPOTENCY_KEY_PARAMETER, idempotent
from marketplace.api.schema import error_responses  # also registers the token scheme
from marketplace.api.serializers import (
    DisputeRequestSerializer,
    DisputeSerializer,
    ListingCreateSerializer,
    ListingSerializer,
    ListingUpdateSerializer,
    OrderCreateSerializer,
    OrderSerializer,
    PayoutCreateSerializer,
    PayoutSerializer,
    QuoteRequestSerializer,
    QuoteSerializer,
    ReceiptSerializer,
    RekeySerializer,
    TopUpRequestSerializer,
    TopUpSerializer,
    WalletSerializer,
)
from marketplace.connect import sandboxes_of
from marketplace.listings import create_listing, delete_listing, update_listing
from marketplace.models import Listing, Order, PayoutRequest
from marketplace.orders import place_order, quote_for, rekey_order, stop_order
from meshnet.api.serializers import ErrorSerializer
from meshnet.models import Sandbox
from meshnet.wgconfig import buyer_config

# --- listings --------------------------------------------------------------------------------


class IntegerFilter(filters.NumberFilter):
    # Amounts, GiB and counts are integers: "1.5" is an error, not a silent rounding.
    field_class = forms.IntegerField


class ListingFilter(filters.FilterSet):
    gpu_model = filters.CharFilter(lookup_expr="iexact", help_text="exact model, any case")
    min_vram_gb = IntegerFilter(field_name="vram_gb", lookup_expr="gte")
    max_price = IntegerFilter(
        field_name="price_per_gpu_hour", lookup_expr="lte", help_text="micro-USD per GPU-hour"
    )
    region = filters.CharFilter(field_name="region")
    min_gpus = IntegerFilter(field_name="gpu_count", lookup_expr="gte")
    min_reliability = IntegerFilter(
        field_name="node__reliability__score",
        lookup_expr="gte",
        help_text="0 to 100; listings whose node has no score yet are left out",
    )

    class Meta:
        model = Listing
        fields = ["gpu_model", "min_vram_gb", "max_price", "region", "min_gpus", "min_reliability"]


MINE_PARAMETER = OpenApiParameter(
    name="mine",
    type=OpenApiTypes.BOOL,
    location=OpenApiParameter.QUERY,
    required=False,
    description="true: your own listings, paused ones included, instead of the market's offers",
)


class ListingViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    queryset = Listing.objects.none()  # for the schema generator; see get_queryset
    serializer_class = ListingSerializer
    filterset_class = ListingFilter
    ordering_fields = ["price_per_gpu_hour", "price_per_gib", "vram_gb", "gpu_count"]
    http_method_names = ["get", "post", "patch", "delete", "head", "options"]

    def get_queryset(self):
        user = self.request.user
        if self.request.method in ("GET", "HEAD", "OPTIONS"):
            if self.action == "list":
                mine = self.request.query_params.get("mine", "").lower() in {"1", "true", "yes"}
                listings = Listing.objects.owned_by(user) if mine else Listing.objects.available()
            else:
                # An active listing is a public offer anyone may read; an owner also sees their
                # own paused ones. Deleted ones are gone for everybody.
                listings = Listing.objects.visible().filter(
                    Q(is_active=True, node__revoked_at__isnull=True) | Q(owner=user)
                )
        else:
            # Changes only through the owner's own listings: anybody else gets a 404.
            listings = Listing.objects.owned_by(user)
        in_use = (
            Order.objects.live()
            .filter(listing=OuterRef("pk"))
            .values("listing")
            .annotate(n=Sum("gpu_count"))
            .values("n")
        )
        return listings.select_related("node__reliability", "owner").annotate(
            gpus_in_use=Coalesce(Subquery(in_use), 0)
        )

    @extend_schema(parameters=[MINE_PARAMETER])
    def list(self, request: Request, *args, **kwargs) -> Response:
        return super().list(request, *args, **kwargs)

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
        return Response(QuoteSerializer(data).data)


# --- orders ----------------------------------------------------------------------------------


class NotProvisioned(APIException):
    status_code = status.HTTP_409_CONFLICT
    default_code = "not_provisioned"


class PlainTextRenderer(BaseRenderer):
    """text/plain for wg-quick files; an error body renders as its message."""

    media_type = "text/plain"
    format = "txt"
    charset = "utf-8"

    def render(self, data, accepted_media_type=None, renderer_context=None) -> bytes:
        if isinstance(data, dict) and "detail" in data:
            data = f"{data['detail']}\n"
        return str(data).encode(self.charset)


class OrderViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """The caller's own orders; another user's order is a 404 on every endpoint."""

    # For the schema generator only; requests always go through get_queryset.
    queryset = Order.objects.none()
    serializer_class = OrderSerializer
    ordering_fields = ["created_at", "id"]

    def get_queryset(self):
        return Order.objects.for_buyer(self.request.user).select_related(
            "listing__node", "job_peer", "settlement", "dispute", "earnings_hold"
        )

    def get_renderers(self):
        if getattr(self, "action", None) == "wireguard_conf":
            return [JSONRenderer(), PlainTextRenderer()]
        return super().get_renderers()

    def _fresh(self, order: Order) -> Order:
        return self.get_queryset().get(pk=order.pk)

    def list(self, request: Request, *args, **kwargs) -> Response:
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        orders = page if page is not None else list(self.filter_queryset(self.get_queryset()))
        context = {**self.get_serializer_context(), "sandboxes": sandboxes_of(o.pk for o in orders)}
        data = OrderSerializer(orders, many=True, context=context).data
        return self.get_paginated_response(data) if page is not None else Response(data)

    @extend_schema(
        request=OrderCreateSerializer,
        parameters=[IDEMPOTENCY_KEY_PARAMETER],
        responses={
            201: OrderSerializer,
            **error_responses(
                {
                    400: "invalid input, naming the field (key, hours, gpu_count, unknown listing)",
                    402: "insufficient funds for the hold",
                    409: "not enough free GPUs, or the listing is not orderable",
                    422: "Idempotency-Key reused with a different body",
                }
            ),
        },
        summary="Order GPUs of a listing; the hold is placed on your wallet at once",
    )
    @idempotent
    def create(self, request: Request) -> Response:
        form = OrderCreateSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        # `image` goes to place_order only when the buyer chose one: place_order defaults to
        # the listing's first image.
        chosen = {"image": form.validated_data["image"]} if "image" in form.validated_data else {}
        order = place_order(
            request.user,
            listing_id=form.validated_data["listing"],
            gpu_count=form.validated_data["gpu_count"],
            hours=form.validated_data["hours"],
            wireguard_public_key=form.validated_data["wireguard_public_key"],
            **chosen,
        )
        return Response(
            self.get_serializer(self._fresh(order)).data, status=status.HTTP_201_CREATED
        )

    @extend_schema(
        request=None,
        parameters=[IDEMPOTENCY_KEY_PARAMETER],
        responses={
            200: OrderSerializer,
            **error_responses(
                {
                    404: "no such order of yours",
                    409: "the order already ended or is stopping",
                    422: "Idempotency-Key reused with a different request",
                }
            ),
        },
        summary="Stop an order (cancelled before it runs; settled after the node drops the peer)",
    )
    @action(detail=True, methods=["post"])
    @idempotent
    def stop(self, request: Request, pk: str | None = None) -> Response:
        order = stop_order(self.get_object())
        return Response(self.get_serializer(self._fresh(order)).data)

    @extend_schema(
        request=RekeySerializer,
        parameters=[IDEMPOTENCY_KEY_PARAMETER],
        responses={
            200: OrderSerializer,
            **error_responses(
                {
                    400: "invalid key, or a key live on another order",
                    404: "no such order of yours",
                    409: "the order is stopping or ended",
                    422: "Idempotency-Key reused with a different request",
                }
            ),
        },
        summary="Replace the order's WireGuard public key (its private key was lost)",
    )
    @action(detail=True, methods=["post"])
    @idempotent
    def rekey(self, request: Request, pk: str | None = None) -> Response:
        form = RekeySerializer(data=request.data)
        form.is_valid(raise_exception=True)
        order = rekey_order(self.get_object(), form.validated_data["wireguard_public_key"])
        return Response(self.get_serializer(self._fresh(order)).data)

    @extend_schema(
        request=DisputeRequestSerializer,
        parameters=[IDEMPOTENCY_KEY_PARAMETER],
        responses={
            201: DisputeSerializer,
            **error_responses(
                {
                    400: "no reason given",
                    404: "no such order of yours",
                    409: "not disputable: not settled, nothing charged, already disputed, or "
                    "the dispute window closed",
                    422: "Idempotency-Key reused with a different request",
                }
            ),
        },
        summary="Dispute a settled order within the dispute window; an operator resolves it",
    )
    @action(detail=True, methods=["post"])
    @idempotent
    def dispute(self, request: Request, pk: str | None = None) -> Response:
        form = DisputeRequestSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        dispute = payments.open_dispute(
            self.get_object(), request.user, form.validated_data["reason"]
        )
        return Response(DisputeSerializer(dispute).data, status=status.HTTP_201_CREATED)

    @extend_schema(
        responses={
            200: ReceiptSerializer,
            **error_responses({404: "no such order of yours", 409: "the order has not ended yet"}),
        },
        summary="The itemised receipt of an ended order; its lines sum to what was captured",
    )
    @action(detail=True, methods=["get"])
    def receipt(self, request: Request, pk: str | None = None) -> Response:
        data = payments.receipt_for(self.get_object())
        data.update(currency=settings.MOLT_CURRENCY, unit=settings.MOLT_CURRENCY_UNIT)
        return Response(ReceiptSerializer(data).data)

    @extend_schema(
        operation_id="orders_wireguard_conf",
        responses={
            (200, "text/plain"): OpenApiResponse(
                OpenApiTypes.STR,
                description="wg-quick config, complete but for the PrivateKey only you hold",
            ),
            (404, "application/json"): OpenApiResponse(
                ErrorSerializer, description="no such order of yours"
            ),
            (409, "application/json"): OpenApiResponse(
                ErrorSerializer, description="not provisioned yet, or ended"
            ),
        },
        summary="Download the order's wg-quick configuration",
    )
    def wireguard_conf(self, request: Request, pk: str | None = None) -> HttpResponse:
        order = self.get_object()
        if order.state in Order.ENDED_STATES or order.state == Order.State.STOPPING:
            raise NotProvisioned(f"order {order.pk} is {order.state}: its tunnel is being removed")
        if order.job_peer_id is None:
            raise NotProvisioned(
                f"order {order.pk} is not provisioned yet: its tunnel address is being "
                "allocated; retry in a few seconds"
            )
        node = order.listing.node
        sandbox = Sandbox.objects.filter(ref=order.job_peer.ref).only("address").first()
        text = buyer_config(
            job_address=order.job_peer.address,
            provider_public_key=node.wireguard_public_key,
            provider_address=node.mesh_address,
            endpoint=node.endpoint,
            order_label=f"order {order.pk} ({order.gpu_count}x {order.listing.gpu_model})",
            sandbox_address=sandbox.address if sandbox is not None else None,
        )
        response = HttpResponse(text, content_type="text/plain; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="molt-order-{order.pk}.conf"'
        return response


# --- wallet ----------------------------------------------------------------------------------


class WalletView(APIView):
    @extend_schema(responses={200: WalletSerializer}, summary="Your balance: available and held")
    def get(self, request: Request) -> Response:
        data = {
            "available": ledger.available_for(request.user),
            "held": ledger.held_for(request.user),
            "earnings": ledger.earnings_for(request.user),
            "earnings_frozen": ledger.frozen_for(request.user),
            "payouts_pending": ledger.payouts_pending_for(request.user),
            "currency": settings.MOLT_CURRENCY,
            "unit": settings.MOLT_CURRENCY_UNIT,
        }
        return Response(WalletSerializer(data).data)


class TopUpView(APIView):
    """Credits enter the ledger by an operator's action (design/money.md): staff may top up
    any user's wallet. Where MOLT_ALLOW_SELF_TOP_UP is true (the default with DEBUG, for demos
    only) any signed-in user may also top up their own wallet; in production that is off and
    the endpoint is operator-only."""

    @extend_schema(
        request=TopUpRequestSerializer,
        parameters=[IDEMPOTENCY_KEY_PARAMETER],
        responses={
            201: TopUpSerializer,
            **error_responses(
                {
                    400: "bad amount, or unknown user",
                    403: "not an operator (and self top-ups are off, or another user's wallet)",
                    422: "Idempotency-Key reused with a different body",
                }
            ),
        },
        summary="Top up a wallet (operators; yourself where self top-ups are enabled)",
    )
    @idempotent
    def post(self, request: Request) -> Response:
        form = TopUpRequestSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        username = form.validated_data.get("user")
        target = request.user
        if request.user.is_staff:
            if username:
                target = get_user_model().objects.filter(username=username).first()
                if target is None:
                    raise ValidationError({"user": [f"unknown user {username!r}"]})
        elif not settings.MOLT_ALLOW_SELF_TOP_UP:
            raise PermissionDenied("top-ups are an operator action: ask an operator for credits")
        elif username and username != request.user.get_username():
            raise PermissionDenied("only operators can top up another user's wallet")
        amount = form.validated_data["amount"]
        txn = payments.top_up(target, amount, by=request.user)
        data = {
            "transaction": txn.pk,
            "user": target.get_username(),
            "amount": amount,
            "available": ledger.available_for(target),
        }
        return Response(TopUpSerializer(data).data, status=status.HTTP_201_CREATED)


# --- payouts ---------------------------------------------------------------------------------


class PayoutViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """A provider's payout requests; another user's is a 404."""

    queryset = PayoutRequest.objects.none()  # for the schema generator; see get_queryset
    serializer_class = PayoutSerializer
    ordering_fields = ["requested_at", "id"]

    def get_queryset(self):
        return PayoutRequest.objects.filter(provider=self.request.user)

    @extend_schema(
        request=PayoutCreateSerializer,
        parameters=[IDEMPOTENCY_KEY_PARAMETER],
        responses={
            201: PayoutSerializer,
            **error_responses(
                {
                    400: "bad amount",
                    402: "more than your earnings (shares in their dispute window are not "
                    "earnings yet)",
                    422: "Idempotency-Key reused with a different body",
                }
            ),
        },
        summary="Ask for earnings to be paid out; they are set aside until an operator pays",
    )
    @idempotent
    def create(self, request: Request) -> Response:
        form = PayoutCreateSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        payout = payments.request_payout(request.user, form.validated_data["amount"])
        return Response(PayoutSerializer(payout).data, status=status.HTTP_201_CREATED)
