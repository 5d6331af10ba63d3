"""One error shape for the whole API.

Service errors (meshnet.errors.MeshError, marketplace.errors.MarketError) become their
`status_code` with `{"detail": message, "code": code}`, plus `{field: [message]}` when the error
names a field, so a form can show the message beside the input. DRF's own errors keep DRF's
shape (validation errors are `{field: [messages]}`; the others get a `code` beside `detail`).
Anything else is a bug: it is logged with its traceback and the client gets a generic 500, never
the traceback or a setting.
"""

from __future__ import annotations

import logging

from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler
from rest_framework.views import set_rollback

from marketplace.errors import MarketError
from meshnet.errors import MeshError

log = logging.getLogger(__name__)


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
    response = drf_exception_handler(exc, context)
    if response is not None:
        if (
            not isinstance(exc, exceptions.ValidationError)
            and isinstance(response.data, dict)
            and "detail" in response.data
        ):
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
