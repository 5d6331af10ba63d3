"""Market API: the caller's orders: placing, stopping, rekeying, disputes, receipts and the
WireGuard config.

Views are thin: serializers check shape and type; marketplace.orders applies the rules and
writes (one transaction each). Another user's order is invisible (404).
"""

from __future__ import annotations

from django.conf import settings
from django.http import HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
)
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import APIException
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from marketplace import payments
from marketplace.api.idempotency import IDEMPOTENCY_KEY_PARAMETER, idempotent
from marketplace.api.schema import error_responses  # also registers the token scheme
from marketplace.api.serializers import (
    DisputeRequestSerializer,
    DisputeSerializer,
    OrderCreateSerializer,
    OrderSerializer,
    ReceiptSerializer,
    RekeySerializer,
)
from marketplace.connect import sandboxes_of
from marketplace.models import Order
from marketplace.orders import place_order, rekey_order, stop_order
from meshnet.api.serializers import ErrorSerializer
from meshnet.hub import buyer_hub_peer
from meshnet.models import Sandbox
from meshnet.names import buyer_dns, sandbox_name
from meshnet.relays import buyer_endpoint as relay_buyer_endpoint
from meshnet.wgconfig import buyer_config


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
            "listing__node",
            "job_peer__relay_allocation__relay",
            "settlement",
            "dispute",
            "earnings_hold",
        )

    def get_renderers(self):
        if getattr(self, "action", None) == "wireguard_conf":
            return [JSONRenderer(), PlainTextRenderer()]
        return super().get_renderers()

    def _fresh(self, order: Order) -> Order:
        return self.get_queryset().get(pk=order.pk)

    def _answer(self, order: Order, code: int = status.HTTP_200_OK) -> Response:
        """The answer to a write: the order read back and serialized, in the write's own
        transaction (see marketplace.api.idempotency.idempotent), so a connection lost here
        rolls the write back and answers 503, and a COMMIT whose answer is lost is resolved
        there. (Read after the commit, a lost connection here gave a 5xx for a committed order.)"""
        return Response(self.get_serializer(self._fresh(order)).data, status=code)

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
        return self._answer(order, status.HTTP_201_CREATED)

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
        return self._answer(order)

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
        return self._answer(order)

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
        parameters=[
            OpenApiParameter(
                "dns",
                str,
                enum=["on"],
                description="on: the DNS line (the node's names responder, docs/names.md) "
                "active, not commented; wg-quick up then needs resolvconf",
            )
        ],
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
            endpoint=relay_buyer_endpoint(order.job_peer),
            order_label=f"order {order.pk} ({order.gpu_count}x {order.listing.gpu_model})",
            sandbox_address=sandbox.address if sandbox is not None else None,
            hub=buyer_hub_peer(),
            dns=buyer_dns(node, sandbox.address if sandbox is not None else None),
            sandbox_name=sandbox_name(order.job_peer.ref) if sandbox is not None else None,
            dns_active=request.query_params.get("dns") == "on",
        )
        response = HttpResponse(text, content_type="text/plain; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="molt-order-{order.pk}.conf"'
        return response
