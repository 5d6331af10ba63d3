"""A Content-Security-Policy for the browser pages.

Pages load only this site's own scripts, styles and images, and talk only to this site
(fetch and the order websocket): an injected script cannot run, and none could send a buyer's
WireGuard private key anywhere else. No inline scripts or styles are used anywhere, so none
is allowed."""

from __future__ import annotations

import functools
from collections.abc import Callable

from django.http import HttpRequest, HttpResponse

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


def content_security_policy(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    @functools.wraps(view)
    def wrapper(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        response = view(request, *args, **kwargs)
        response.setdefault("Content-Security-Policy", POLICY)
        return response

    return wrapper
