"""Market API: the caller's wallet, operator top-ups and provider payouts.

Views are thin: marketplace.ledger reads balances and marketplace.payments writes (one
transaction each). Another user's wallet and payouts are invisible (404).
"""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth import get_user_model
from drf_spectacular.utils import (
    extend_schema,
)
from rest_framework import mixins, status, viewsets
from rest_framework.exceptions import PermissionDenied, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from marketplace import ledger, payments
from marketplace.api.idempotency import IDEMPOTENCY_KEY_PARAMETER, idempotent
from marketplace.api.schema import error_responses  # also registers the token scheme
from marketplace.api.serializers import (
    PayoutCreateSerializer,
    PayoutSerializer,
    TopUpRequestSerializer,
    TopUpSerializer,
    WalletSerializer,
)
from marketplace.auth import acts_as_staff
from marketplace.models import PayoutRequest


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
        # Staff powers need the second factor (a session without its code is a plain user's).
        if acts_as_staff(request):
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
