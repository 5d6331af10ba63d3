"""Multi-node orders: /api/v1/clusters/ (marketplace.clusters). One POST places every part and
the one hold; stop ends every part. Each part is also an order of /api/v1/orders/ (its
wireguard.conf, receipt and dispute are there). Another user's cluster is a 404."""

from __future__ import annotations

from django.db.models import Prefetch
from django.http import HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from marketplace.api.cluster_serializers import ClusterCreateSerializer, ClusterSerializer
from marketplace.api.idempotency import IDEMPOTENCY_KEY_PARAMETER, idempotent
from marketplace.api.order_views import PlainTextRenderer
from marketplace.api.schema import error_responses
from marketplace.api.serializers import RekeySerializer
from marketplace.cluster_models import Cluster
from marketplace.cluster_tunnel import cluster_config
from marketplace.clusters import PartSpec, place_cluster, rekey_cluster, stop_cluster
from marketplace.models import Order
from meshnet.api.serializers import ErrorSerializer


class ClusterViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """The caller's own multi-node orders."""

    queryset = Cluster.objects.none()  # for the schema generator; requests use get_queryset
    serializer_class = ClusterSerializer

    def get_queryset(self):
        parts = Order.objects.select_related(
            "listing__node", "job_peer", "settlement", "dispute", "earnings_hold"
        ).order_by("part_index")
        return (
            Cluster.objects.filter(buyer=self.request.user)
            .select_related("hold__account")
            .prefetch_related(Prefetch("parts", queryset=parts))
        )

    def get_renderers(self):
        if getattr(self, "action", None) == "wireguard_conf":
            return [JSONRenderer(), PlainTextRenderer()]
        return super().get_renderers()

    def _fresh(self, cluster: Cluster) -> dict:
        return self.get_serializer(self.get_queryset().get(pk=cluster.pk)).data

    @extend_schema(
        request=ClusterCreateSerializer,
        parameters=[IDEMPOTENCY_KEY_PARAMETER],
        responses={
            201: ClusterSerializer,
            **error_responses(
                {
                    400: "invalid input, naming the field (parts[i].listing for an unknown or "
                    "repeated listing, wireguard_public_key, hours, on_part_loss)",
                    402: "insufficient funds for the one hold of all parts",
                    409: "not enough free GPUs on a part's listing, or your own listing",
                    422: "Idempotency-Key reused with a different body",
                }
            ),
        },
        summary="Order GPUs on several listings (nodes) as one job with one hold",
    )
    @idempotent
    def create(self, request: Request) -> Response:
        form = ClusterCreateSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        data = form.validated_data
        cluster = place_cluster(
            request.user,
            parts=[
                PartSpec(
                    listing=p["listing"],
                    gpu_count=p["gpu_count"],
                    image=p.get("image"),
                )
                for p in data["parts"]
            ],
            hours=data["hours"],
            on_part_loss=data["on_part_loss"],
            wireguard_public_key=data["wireguard_public_key"],
        )
        return Response(self._fresh(cluster), status=status.HTTP_201_CREATED)

    @extend_schema(
        request=None,
        parameters=[IDEMPOTENCY_KEY_PARAMETER],
        responses={
            200: ClusterSerializer,
            **error_responses(
                {
                    404: "no such multi-node order of yours",
                    409: "every part already ended or is stopping",
                    422: "Idempotency-Key reused with a different request",
                }
            ),
        },
        summary="Stop every part (cancelled before running; settled when the nodes drop them)",
    )
    @action(detail=True, methods=["post"])
    @idempotent
    def stop(self, request: Request, pk: str | None = None) -> Response:
        cluster = stop_cluster(self.get_object())
        return Response(self._fresh(cluster))

    @extend_schema(
        request=RekeySerializer,
        parameters=[IDEMPOTENCY_KEY_PARAMETER],
        responses={
            200: ClusterSerializer,
            **error_responses(
                {
                    400: "invalid key, a key live on another order, or a multi-node order "
                    "placed with a key per part",
                    404: "no such multi-node order of yours",
                    409: "every part is stopping or ended",
                    422: "Idempotency-Key reused with a different request",
                }
            ),
        },
        summary="Replace the one WireGuard public key of every part (its private key was lost)",
    )
    @action(detail=True, methods=["post"])
    @idempotent
    def rekey(self, request: Request, pk: str | None = None) -> Response:
        form = RekeySerializer(data=request.data)
        form.is_valid(raise_exception=True)
        cluster = rekey_cluster(self.get_object(), form.validated_data["wireguard_public_key"])
        return Response(self._fresh(cluster))

    @extend_schema(
        operation_id="clusters_wireguard_conf",
        responses={
            (200, "text/plain"): OpenApiResponse(
                OpenApiTypes.STR,
                description="one wg-quick config for every part: one [Interface] (your one "
                "tunnel address) and one [Peer] per node, complete but for the PrivateKey",
            ),
            (404, "application/json"): OpenApiResponse(
                ErrorSerializer, description="no such multi-node order of yours"
            ),
            (409, "application/json"): OpenApiResponse(
                ErrorSerializer, description="no part provisioned yet, or every part ended"
            ),
        },
        parameters=[
            OpenApiParameter(
                "dns",
                str,
                enum=["on"],
                description="on: the DNS line (a node's names responder, which answers every "
                "part's name, docs/names.md) active, not commented; wg-quick up then needs "
                "resolvconf",
            )
        ],
        summary="Download the multi-node order's one wg-quick configuration",
    )
    def wireguard_conf(self, request: Request, pk: str | None = None) -> HttpResponse:
        cluster = self.get_object()
        text = cluster_config(cluster, dns_active=request.query_params.get("dns") == "on")
        response = HttpResponse(text, content_type="text/plain; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="molt-cluster-{cluster.pk}.conf"'
        return response
