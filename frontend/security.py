"""A Content-Security-Policy for the browser pages, set by a middleware on every HTML response.

Pages load only this site's own scripts, styles and images, and talk only to this site
(fetch and the order websocket): an injected script cannot run, and none could send a buyer's
WireGuard private key anywhere else. No inline scripts or styles are used anywhere, so none
is allowed.

A middleware, not a decorator per view: a page added later gets the policy without anyone
remembering to ask for it. The admin and the API's HTML pages get it with inline styles allowed
(below, with the reason); scripts are this site's files everywhere.
"""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse
from django.utils.cache import patch_cache_control
from rest_framework.response import Response

POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        # blob: for the config download link, data: for nothing today but the favicon's kin.
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)

# Pages that are not ours: Django's admin (the ops dashboard is in it) and DRF's own HTML (the
# API's browsable pages and drf-spectacular's Swagger UI at /api/docs/, both DRF responses).
# Their scripts are all files of this site (the docs page is drf-spectacular's split view: its
# init script is a file too), so scripts stay 'self' only, the policy's point; their templates
# carry inline styles (Swagger UI's page a <style> block), so styles may be inline there.
STAFF_AND_DOCS_POLICY = POLICY.replace("style-src 'self'", "style-src 'self' 'unsafe-inline'")
LOOSER_STYLES_NAMESPACES = frozenset({"admin"})


def policy_for(request: HttpRequest, response: HttpResponse) -> str:
    if isinstance(response, Response):
        return STAFF_AND_DOCS_POLICY
    match = request.resolver_match  # None when no URL matched (a 404): those get the policy
    if match is not None and LOOSER_STYLES_NAMESPACES & set(match.namespaces):
        return STAFF_AND_DOCS_POLICY
    return POLICY


class ContentSecurityPolicyMiddleware:
    """Adds a policy to every text/html response (policy_for), unless the view set its own."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        content_type = response.get("Content-Type", "")
        if content_type.startswith("text/html"):
            response.setdefault("Content-Security-Policy", policy_for(request, response))
        return response


class PrivateNoStoreMiddleware:
    """Responses to a signed-in browser or an API client with a credential say
    ``Cache-Control: no-store, private``: an order page, a wallet or an API answer is one
    person's, and neither a shared proxy nor the browser's back/forward cache on a shared
    computer should keep it. Anonymous pages (the marketplace, sign-in) stay cacheable. A view
    that set its own Cache-Control keeps it."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        user = getattr(request, "user", None)
        signed_in = bool(user is not None and user.is_authenticated)
        if (signed_in or "HTTP_AUTHORIZATION" in request.META) and not response.has_header(
            "Cache-Control"
        ):
            patch_cache_control(response, no_store=True, private=True)
        return response
