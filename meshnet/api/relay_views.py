"""The relays' control API: a relay process (meshnet.relay, `--control`) asks for its pairs.

POST /api/v1/relay/pairs/ with `Authorization: Bearer molt_relay_...` and a JSON body
`{"status": {...}}` (the relay's own report: per pair, bytes forwarded and whether it
handshook). The answer is `{"pairs": [...]}`: per relayed job peer its two ports and the two
*public* keys (the relay checks handshake messages' mac1 with them; it never gets a private
key). A POST, so the load report and the poll are one request; no session, no cookie.
"""

from __future__ import annotations

from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from meshnet.api.serializers import ErrorSerializer
from meshnet.relays import authenticate_relay, record_relay_poll


class RelayPairsView(APIView):
    authentication_classes: list = []
    permission_classes = [AllowAny]

    @extend_schema(
        operation_id="relay_pairs",
        request=inline_serializer("RelayPoll", {"status": serializers.DictField(required=False)}),
        responses={
            200: inline_serializer(
                "RelayPairs", {"pairs": serializers.ListField(child=serializers.DictField())}
            ),
            401: OpenApiResponse(ErrorSerializer, description="no or wrong relay token"),
        },
        summary="A relay's pairs (relays only: Bearer token of a relay listed in the admin)",
    )
    def post(self, request: Request) -> Response:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        relay = authenticate_relay(token.strip()) if scheme == "Bearer" else None
        if relay is None:
            return Response(
                {"detail": "a relay token is required", "code": "not_authenticated"},
                status=status.HTTP_401_UNAUTHORIZED,
            )
        report = request.data.get("status") if isinstance(request.data, dict) else None
        pairs = record_relay_poll(relay, report if isinstance(report, dict) else {})
        return Response({"pairs": pairs})
