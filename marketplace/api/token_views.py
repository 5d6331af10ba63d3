"""The caller's API tokens: list them (never their secret: a hint, a name and when they were
made, last used and expire) and revoke one. Issuing is `POST /api/v1/auth/token/`."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import mixins, serializers, viewsets
from rest_framework.request import Request
from rest_framework.response import Response

from marketplace import tokens
from marketplace.models import ApiToken


class ApiTokenInfoSerializer(serializers.ModelSerializer):
    class Meta:
        model = ApiToken
        fields = ["id", "name", "hint", "created_at", "last_used_at", "expires_at"]
        read_only_fields = fields


class ApiTokenViewSet(mixins.ListModelMixin, viewsets.GenericViewSet):
    """The caller's own tokens; another user's token id is a 404."""

    queryset = ApiToken.objects.none()  # for the schema generator; see get_queryset
    serializer_class = ApiTokenInfoSerializer
    ordering_fields = ["created_at", "id"]

    def get_queryset(self):
        return ApiToken.objects.filter(user=self.request.user).order_by("-created_at", "-id")

    @extend_schema(responses={204: None}, summary="Revoke one of your API tokens")
    def destroy(self, request: Request, pk: str | None = None) -> Response:
        # Revoking the token this request came with is allowed: the next request fails.
        if not (pk or "").isdigit() or not tokens.revoke_api_token(request.user, int(pk)):
            return Response(
                {"detail": "No ApiToken matches the given query.", "code": "not_found"}, status=404
            )
        return Response(status=204)
