"""POST /stripe/webhook/: where Stripe delivers Checkout events (marketplace/stripe_checkout.py).

A plain Django view, not DRF: the signature is over the exact bytes of the body, so nothing may
parse or re-encode it first. CSRF-exempt because Stripe cannot hold a CSRF token; the Stripe
signature, verified with the webhook secret, is what authenticates the request."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from marketplace import stripe_checkout


@csrf_exempt
@require_POST
def stripe_webhook(request: HttpRequest) -> JsonResponse:
    answer = stripe_checkout.handle_webhook(request.body, request.headers.get("Stripe-Signature"))
    return JsonResponse({"detail": answer.detail}, status=answer.status)
