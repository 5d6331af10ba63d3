"""`Idempotency-Key` for money-moving POSTs (design/money.md).

A client that sends the header may retry the request as often as it likes: the first successful
(2xx) response is stored and every retry with the same key and the same request gets it back
byte for byte, without running the view again (so nothing moves twice). The same key with a
different request is refused with 422. Error responses are not stored: a retry after a 402 or a
409 runs again.

How it stays exactly-once: the view runs inside one transaction that starts by inserting the
key's IdempotencyRecord (a placeholder) and ends by filling in the response; the unique
(user, key) constraint does the rest. On PostgreSQL a concurrent duplicate blocks on that unique
index until the first transaction ends: if it committed, the duplicate gets IntegrityError,
re-reads the record and replays it; if it rolled back, the duplicate goes ahead as the first.
On SQLite, IMMEDIATE transactions serialize the two anyway. Because the placeholder is never
committed, a record seen with the in-flight status means a bug, and is answered with 409.

Use it on a view method and document the header with IDEMPOTENCY_KEY_PARAMETER:

    @extend_schema(parameters=[IDEMPOTENCY_KEY_PARAMETER], ...)
    @idempotent
    def create(self, request): ...
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable

from django.db import IntegrityError, transaction
from django.http import HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter
from rest_framework import status
from rest_framework.exceptions import APIException
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from marketplace.models import IdempotencyRecord

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
# Visible ASCII only: the key is echoed in error messages and must fit the unique column.
_KEY_RE = re.compile(r"[\x21-\x7e]{1,255}")
# The placeholder's status while the first request runs. It is never committed (the record is
# filled in before commit or rolled back with the request), so seeing it means a bug.
IN_FLIGHT = 0

IDEMPOTENCY_KEY_PARAMETER = OpenApiParameter(
    name=HEADER,
    type=OpenApiTypes.STR,
    location=OpenApiParameter.HEADER,
    required=False,
    description=(
        "Optional. A client-chosen key (1-255 visible ASCII characters) that makes this request "
        "safe to retry: a retry with the same key and body returns the first successful "
        "response byte for byte and moves nothing (the replay carries "
        f"`{REPLAYED_HEADER}: true`); the same key with a different body is refused with 422. "
        "Keys are scoped to the authenticated user."
    ),
)


class InvalidIdempotencyKey(APIException):
    status_code = status.HTTP_400_BAD_REQUEST
    default_code = "invalid_idempotency_key"
    default_detail = f"{HEADER} must be 1 to 255 visible ASCII characters"


class IdempotencyKeyReused(APIException):
    status_code = status.HTTP_422_UNPROCESSABLE_ENTITY
    default_code = "idempotency_key_reused"


class IdempotencyKeyInFlight(APIException):
    status_code = status.HTTP_409_CONFLICT
    default_code = "idempotency_key_in_flight"


def request_fingerprint(request: Request) -> str:
    """SHA-256 of the method, the path and the body as canonical JSON (sorted keys, no
    insignificant whitespace), so key order or spacing in a retry does not matter."""
    data = request.data
    if hasattr(data, "lists"):  # a form-encoded QueryDict: keep repeated fields
        data = dict(data.lists())
    body = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    digest = hashlib.sha256()
    for part in (request.method or "", request.path, body):
        digest.update(part.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def _json_response(status_code: int, body: str, *, replayed: bool) -> HttpResponse:
    response = HttpResponse(
        body.encode("utf-8"), status=status_code, content_type="application/json"
    )
    if replayed:
        response[REPLAYED_HEADER] = "true"
    return response


def _rendered_body(response: HttpResponse) -> str:
    if isinstance(response, Response):
        return JSONRenderer().render(response.data).decode("utf-8")
    return response.content.decode("utf-8")


def _claim(user, key: str, fingerprint: str) -> tuple[IdempotencyRecord, bool]:
    """The key's record and whether this request claimed it (True: run the view). Must run
    inside the request's transaction."""
    existing = IdempotencyRecord.objects.filter(user=user, key=key).first()
    if existing is None:
        try:
            with transaction.atomic():
                record = IdempotencyRecord.objects.create(
                    user=user,
                    key=key,
                    fingerprint=fingerprint,
                    status_code=IN_FLIGHT,
                    response_body="",
                )
            return record, True
        except IntegrityError:
            # A concurrent request with this key committed while we waited on the unique index.
            existing = IdempotencyRecord.objects.get(user=user, key=key)
    shown = key if len(key) <= 64 else key[:61] + "..."
    if existing.fingerprint != fingerprint:
        raise IdempotencyKeyReused(
            f"{HEADER} {shown!r} was already used for a different request; "
            "send a new key for a new request"
        )
    if existing.status_code == IN_FLIGHT:
        raise IdempotencyKeyInFlight(
            f"a request with {HEADER} {shown!r} is still being processed; retry shortly"
        )
    return existing, False


def idempotent(handler: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Make a DRF view method honour the Idempotency-Key header (see the module docstring).

    Without the header the method runs as usual. With it, the method runs inside one
    transaction together with the key's record; a non-2xx response rolls that transaction back.
    """

    @functools.wraps(handler)
    def wrapper(view, request: Request, *args, **kwargs) -> HttpResponse:
        key = request.headers.get(HEADER)
        if key is None:
            return handler(view, request, *args, **kwargs)
        if not _KEY_RE.fullmatch(key):
            raise InvalidIdempotencyKey()
        fingerprint = request_fingerprint(request)
        with transaction.atomic():
            record, claimed = _claim(request.user, key, fingerprint)
            if not claimed:
                return _json_response(record.status_code, record.response_body, replayed=True)
            response = handler(view, request, *args, **kwargs)
            if not 200 <= response.status_code < 300:
                # Only successes are remembered; the key stays free for a corrected retry.
                transaction.set_rollback(True)
                return response
            body = _rendered_body(response)
            IdempotencyRecord.objects.filter(pk=record.pk).update(
                status_code=response.status_code, response_body=body
            )
            return _json_response(response.status_code, body, replayed=False)

    return wrapper
