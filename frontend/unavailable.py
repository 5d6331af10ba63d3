"""Redis out of reach on a page that needs the cache (the log-in, sign-up and admin log-in
forms count failures there: meshnet.throttling.LoginGuard): 503 with Retry-After, the page
saying to retry, instead of Django's 500. The API answers the same fault itself
(marketplace.api.errors, 503 `unavailable`). Nothing is let through uncounted."""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.http import HttpRequest, HttpResponse

from marketplace.api.errors import CACHE_DOWN

log = logging.getLogger(__name__)

PAGE = (
    '<!doctype html><html lang="en"><head><meta charset="utf-8">'
    "<title>MOLT is briefly unavailable</title></head><body><main>"
    "<h1>Briefly unavailable</h1><p>MOLT cannot reach one of its services right now. "
    "Nothing was done; please try again in a few seconds.</p></main></body></html>"
)


class ServiceUnavailableMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if not isinstance(exception, CACHE_DOWN):
            return None
        log.warning(
            "cache unavailable in %s %s: %s", request.method, request.path, type(exception).__name__
        )
        response = HttpResponse(PAGE, status=503, content_type="text/html; charset=utf-8")
        response["Retry-After"] = "5"
        return response
