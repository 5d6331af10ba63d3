"""API tokens: issue one for a username and password (`POST /api/v1/auth/token/`, behind the
log-in guard), list the caller's (never their secret: a hint, a name and when they were made,
last used and expire) and revoke one."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth import authenticate
from django_otp import match_token
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import exceptions, mixins, serializers, status, viewsets
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from marketplace import tokens
from marketplace.api.serializers import ApiTokenRequestSerializer, ApiTokenSerializer
from marketplace.models import ApiToken
from meshnet.throttling import AuthTokenThrottle, LoginGuard, client_address, wait_message


class ApiTokenView(APIView):
    # Credentials are in the body: no session (and so no CSRF) and no token needed to get one.
    permission_classes = [AllowAny]
    authentication_classes: list = []
    # A password is guessed by repetition: limited per client address.
    throttle_classes = [AuthTokenThrottle]

    @extend_schema(
        operation_id="auth_token_create",
        request=ApiTokenRequestSerializer,
        responses={
            201: ApiTokenSerializer,
            400: OpenApiResponse(description="wrong credentials"),
            429: OpenApiResponse(description="too many attempts from this address"),
        },
        summary="Exchange a username and password for an API token",
        auth=[],
    )
    def post(self, request: Request) -> Response:
        credentials = ApiTokenRequestSerializer(data=request.data)
        credentials.is_valid(raise_exception=True)
        username = credentials.validated_data["username"]
        # The same log-in guard as the site's and the admin's forms (per account, per address).
        guard = LoginGuard(client_address(request), username)
        wait = guard.retry_after()
        if wait:
            raise exceptions.Throttled(wait, detail=wait_message(wait, "failed log-ins"))
        user = authenticate(
            request, username=username, password=credentials.validated_data["password"]
        )
        if user is None:
            guard.record()
            raise serializers.ValidationError(
                {"non_field_errors": ["unable to log in: wrong username or password"]}
            )
        # A staff token acts with staff powers (top-ups for others), so it costs the same second
        # factor as the admin (frontend/staff_otp.py); a wrong code counts like a wrong password.
        if user.is_staff and settings.MOLT_STAFF_OTP_REQUIRED:
            code = credentials.validated_data.get("otp_token", "").strip()
            if not code.isdigit() or match_token(user, code) is None:
                guard.record()
                raise serializers.ValidationError(
                    {
                        "otp_token": [
                            "staff accounts need the code their authenticator app shows "
                            "(enrol one at /accounts/staff-otp/)"
                        ]
                    }
                )
        token = tokens.issue_api_token(
            user, name="api", staff_code=user.is_staff and settings.MOLT_STAFF_OTP_REQUIRED
        )
        return Response(ApiTokenSerializer({"token": token}).data, status=status.HTTP_201_CREATED)


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
