"""One error shape for the whole API.

Service errors (meshnet.errors.MeshError, marketplace.errors.MarketError) become their
`status_code` with `{"detail": message, "code": code}`, plus `{field: [message]}` when the error
names a field, so a form can show the message beside the input. DRF's own errors get the same
shape: a `code` beside `detail`, and validation errors `{"detail", "code"}` before DRF's
`{field: [messages]}` (validation_body).
A database that dropped the connection or could not finish the transaction (a backend
terminated, a failover, a deadlock or lock timeout) is a fault of the moment, not a bug: 503
`unavailable` with Retry-After, so a client retries (the transaction rolled back; an order's
Idempotency-Key makes even a retry after a lost COMMIT answer safe). So is Redis out of reach
where a request needs the cache (the log-in guard's and the throttles' counts): 503
`unavailable` too, nothing done, rather than letting guesses through uncounted. Anything else is
a bug: it is logged with its traceback and the client gets a generic 500, never the traceback or
a setting.
"""

from __future__ import annotations

import logging

from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.db import InterfaceError, OperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler
from rest_framework.views import set_rollback

from marketplace.api.parsing import max_body_bytes
from marketplace.errors import MarketError
from meshnet.errors import MeshError

log = logging.getLogger(__name__)

# Redis unreachable (refused, reset, timed out): the cache's counts cannot be read or kept.
CACHE_DOWN = (RedisConnectionError, RedisTimeoutError)


def service_error_body(exc: MarketError | MeshError) -> dict[str, object]:
    message = str(exc)
    body: dict[str, object] = {"detail": message, "code": exc.code}
    field = getattr(exc, "field", None)
    if field:
        body[field] = [message]
    return body


def exception_handler(exc: Exception, context: dict) -> Response | None:
    if isinstance(exc, MarketError | MeshError):
        set_rollback()
        return Response(service_error_body(exc), status=exc.status_code)
    if isinstance(exc, RequestDataTooBig):
        # Django refuses to read a body over DATA_UPLOAD_MAX_MEMORY_SIZE: the client sent too
        # much, which is a 413, not a server fault.
        return Response(
            {
                "detail": f"request body is larger than {max_body_bytes()} bytes",
                "code": "too_large",
            },
            status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
        )
    if isinstance(exc, SuspiciousOperation):
        return Response(
            {"detail": "the request is malformed", "code": "bad_request"},
            status=status.HTTP_400_BAD_REQUEST,
        )
    if isinstance(exc, OperationalError | InterfaceError):
        # The faults tier terminates PostgreSQL backends mid-request: these answered 500
        # "internal error" before, which no client retries.
        return _unavailable(
            "database",
            exc,
            context,
            "the database is unavailable; retry shortly, with the same Idempotency-Key",
            retry_after=1,
        )
    if isinstance(exc, CACHE_DOWN):
        return _unavailable("cache", exc, context, CACHE_DOWN_DETAIL, retry_after=5)
    response = drf_exception_handler(exc, context)
    if response is not None:
        if isinstance(exc, exceptions.ValidationError):
            response.data = validation_body(response.data)
        elif isinstance(response.data, dict) and "detail" in response.data:
            detail = response.data["detail"]
            response.data["code"] = getattr(detail, "code", None) or getattr(
                exc, "default_code", "error"
            )
        return response
    set_rollback()
    view = context.get("view")
    request = context.get("request")
    log.error(
        "unhandled %s in %s %s",
        type(exc).__name__,
        getattr(request, "method", "?"),
        getattr(request, "path", "?"),
        exc_info=exc,
        extra={"view": type(view).__name__ if view else None},
    )
    return Response(
        {"detail": "internal error; it has been logged", "code": "server_error"},
        status=status.HTTP_500_INTERNAL_SERVER_ERROR,
    )


def validation_body(data) -> dict:
    """DRF's validation errors in the one error shape: `{"detail", "code"}` first (every message,
    as "field: message; other field: message", which is what the site's pages show; the code
    of the first), then `{field: [messages]}` as DRF gives them, for a form to place beside its
    inputs. A bare list (errors of no one field) goes under `non_field_errors`."""
    fields = data if isinstance(data, dict) else {"non_field_errors": data}
    parts, codes = [], []
    for field, value in fields.items():
        messages = _messages(value, codes)
        text = " ".join(messages)
        parts.append(text if field == "non_field_errors" else f"{field.replace('_', ' ')}: {text}")
    return {
        "detail": "; ".join(parts) or "invalid input",
        "code": codes[0] if codes else "invalid",
        **fields,
    }


def _messages(value, codes: list[str]) -> list[str]:
    """Every message in a field's errors (a list, or nested per item or sub-field), in order;
    their codes appended to `codes`."""
    if isinstance(value, dict):
        return [m for sub in value.values() for m in _messages(sub, codes)]
    if isinstance(value, list | tuple):
        return [m for item in value for m in _messages(item, codes)]
    code = getattr(value, "code", None)
    if code:
        codes.append(str(code))
    return [str(value)]


CACHE_DOWN_DETAIL = "the service is briefly unavailable; retry shortly"


def _unavailable(
    what: str, exc: Exception, context: dict, detail: str, *, retry_after: int
) -> Response:
    """503 `unavailable` for a fault of the moment in `what` (the transaction is rolled back),
    logged as a warning with the request and the fault's first line, never its traceback."""
    set_rollback()
    request = context.get("request")
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    log.warning(
        "%s unavailable in %s %s: %s: %s",
        what,
        getattr(request, "method", "?"),
        getattr(request, "path", "?"),
        type(exc).__name__,
        first_line,
    )
    return _unavailable_response(detail, retry_after)


def _unavailable_response(detail: str, retry_after: int) -> Response:
    return Response(
        {"detail": detail, "code": "unavailable"},
        status=status.HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": str(retry_after)},
    )


def not_found(request, exception=None):
    """handler404 (config/urls.py): a path under /api/ that no route matches (an id that is not
    a number, `/api/v1/orders/x/stop/`) answers in the API's error shape, as JSON, like every
    other API error; elsewhere Django's page. Schemathesis found the API's HTML 404 there."""
    from django.http import JsonResponse
    from django.views.defaults import page_not_found

    if request.path.startswith("/api/"):
        return JsonResponse({"detail": "not found", "code": "not_found"}, status=404)
    return page_not_found(request, exception)
