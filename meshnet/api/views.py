"""Mesh API: a provider's nodes, enrolment tokens, and the agent's enrolment call.

Views are thin: they check shape with serializers and call meshnet.enrolment.
"""

from __future__ import annotations

from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from meshnet import ipplan
from meshnet.api.serializers import (
    EnrollEnvelopeSerializer,
    EnrollmentSerializer,
    EnrollmentTokenSerializer,
    ErrorSerializer,
    NodeSerializer,
)
from meshnet.enrolment import create_enrollment_token, enroll_node, websocket_url
from meshnet.gateway_key import gateway_identity, key_sequence
from meshnet.models import Node
from meshnet.throttling import EnrollThrottle


def gateway_base_url(request: Request) -> str:
    """The gateway's URL as the client reached it, without the trailing slash."""
    return request.build_absolute_uri("/").rstrip("/")


class EnrollmentTokenView(APIView):
    @extend_schema(
        operation_id="enrollment_tokens_create",
        request=None,
        responses={201: EnrollmentTokenSerializer},
        summary="Create a one-time enrolment token and the install line for a provider machine",
    )
    def post(self, request: Request) -> Response:
        issued = create_enrollment_token(request.user)
        base = gateway_base_url(request)
        data = {
            "token": issued.token,
            "expires_at": issued.record.expires_at,
            "install_command": (
                f"curl -fsSL {base}/install.sh | sudo sh -s -- --token {issued.token}"
            ),
        }
        return Response(EnrollmentTokenSerializer(data).data, status=status.HTTP_201_CREATED)


class NodeViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """The caller's own nodes; another user's node is a 404."""

    queryset = Node.objects.none()  # for the schema generator; see get_queryset
    serializer_class = NodeSerializer
    filter_backends: list = []

    def get_queryset(self):
        return Node.objects.owned_by(self.request.user).prefetch_related("gpus").order_by("id")

    @extend_schema(
        operation_id="nodes_address",
        responses={
            200: OpenApiResponse(
                inline_serializer("SeenAddress", {"address": serializers.IPAddressField()}),
                description="the address this request came from",
            ),
            429: OpenApiResponse(
                ErrorSerializer, description="too many requests from this address"
            ),
        },
        summary="The address the gateway sees the caller at (called by `clawnode join`)",
        description=(
            "The source address of this request as the gateway counts it (REMOTE_ADDR, or the "
            "client's address behind MOLT_TRUSTED_PROXIES). `clawnode join` asks it before "
            "enrolling: when the machine holds that address itself, nothing translates its "
            "packets, and it declares that address with its WireGuard port as its endpoint."
        ),
        auth=[],
    )
    # A machine learns its own address as others see it, which nothing else here tells it;
    # no credential is needed (it says nothing the caller does not already know), and it is
    # limited per address like enrolment.
    @action(
        detail=False,
        methods=["get"],
        permission_classes=[AllowAny],
        authentication_classes=[],
        throttle_classes=[EnrollThrottle],
    )
    def address(self, request: Request) -> Response:
        return Response({"address": request.META.get("REMOTE_ADDR", "")})

    @extend_schema(
        operation_id="nodes_enroll",
        request=EnrollEnvelopeSerializer,
        responses={
            201: OpenApiResponse(EnrollmentSerializer, description="node enrolled"),
            200: OpenApiResponse(
                EnrollmentSerializer, description="safe retry: this identity was already enrolled"
            ),
            400: OpenApiResponse(
                ErrorSerializer, description="malformed request, or a region the plan lacks"
            ),
            403: OpenApiResponse(
                ErrorSerializer,
                description="refused: bad signature, stale, replayed, token unknown/used/expired",
            ),
            409: OpenApiResponse(
                ErrorSerializer,
                description="the mesh address pool (the region's block, or molt) is exhausted",
            ),
            429: OpenApiResponse(
                ErrorSerializer, description="too many enrolment attempts from this address"
            ),
        },
        summary="Register a provider node (called by `clawnode join`, signed by the node)",
        description=(
            "The body is an enrolment request signed by the node's Ed25519 identity; the "
            "one-time enrolment token inside it is the credential. Re-sending the same identity "
            "with the token it already used returns the same node (200)."
        ),
        auth=[],
    )
    # The agent has no session and no API token: the signed envelope and the one-time token in
    # it are the credentials, so session auth (and with it CSRF) is off for this call.
    @action(
        detail=False,
        methods=["post"],
        permission_classes=[AllowAny],
        authentication_classes=[],
        # The enrolment token is guessed by repetition: limited per client address.
        throttle_classes=[EnrollThrottle],
    )
    def enroll(self, request: Request) -> Response:
        envelope = EnrollEnvelopeSerializer(data=request.data)
        envelope.is_valid(raise_exception=True)
        enrolment = enroll_node(
            dict(envelope.validated_data), observed_ip=request.META.get("REMOTE_ADDR")
        )
        node = enrolment.node
        gateway_key = gateway_identity().public_key_b64
        data = {
            "node_id": node.node_id,
            "name": node.name,
            "mesh_address": node.mesh_address,
            "gateway_public_key": gateway_key,
            "websocket_url": websocket_url(gateway_base_url(request)),
            "wireguard_listen_port": node.listen_port,
            "hub_address": str(ipplan.GATEWAY_HUB_ADDRESS),
            # The node's interface carries its address with the whole mesh's prefix (its
            # region's block or the MOLT block, the hub's control block and every other node's
            # block are on-link there), and routes the job block to the interface: buyers' job
            # addresses come from there.
            "mesh_network": str(ipplan.mesh_network()),
            "region": node.region,
            "job_network": ipplan.block(ipplan.JOB_BLOCK).cidr,
        }
        # The pinned key's place in the chain of key certificates: the agent follows later
        # rotations from there (clawnode.wire.keycert). Left out when the chain does not name
        # the key (a misconfigured gateway): the agent then finds its key in the chain itself.
        sequence = key_sequence(gateway_key)
        if sequence is not None:
            data["gateway_key_sequence"] = sequence
        return Response(
            EnrollmentSerializer(data).data,
            status=status.HTTP_201_CREATED if enrolment.created else status.HTTP_200_OK,
        )
