"""`Idempotency-Key` for money-moving POSTs (design/money.md; issue 4).

A client that sends the header may retry the request as often as it likes: the first successful
(2xx) response is stored and every retry with the same key and the same request gets it back
byte for byte, without running the view again (so nothing moves twice). The same key with a
different request is refused with 422. A retry that arrives while the first request is still
running is refused with 409 (retry shortly). Error responses are not stored: a retry after a
402 or a 409 runs again. Keys are kept MOLT_IDEMPOTENCY_KEY_TTL_SECONDS (at least 24 h; the
purge-idempotency-keys beat task deletes older ones).

How it stays exactly-once:

1. Claim. The key's IdempotencyRecord is inserted in a short transaction of its own and
   committed at once, in flight (status 0) with a random claim token. A concurrent duplicate
   hits the unique (user, key) constraint immediately (the row is committed, nothing to wait
   for), reads the in-flight row and gets 409.
2. Work. The view runs in one transaction that ends by storing the response on the record by
   compare-and-set on the claim token. The response and every write of the view commit
   together, or neither does: an in-flight record therefore means the work has not committed.
3. Failure. A non-2xx response or an exception rolls the work back and deletes the claim (same
   compare-and-set), so a corrected retry with the key runs.
4. Crash. A process that dies between 1 and 2 leaves an in-flight record whose work never
   committed. After MOLT_IDEMPOTENCY_IN_FLIGHT_SECONDS a retry takes the claim over (a new token
   by compare-and-set) and runs; on PostgreSQL at once (after a 5 s grace for the gap between
   the claim and its work), because the work holds an advisory lock for as long as its
   transaction lives and a retry finds it free. Should the first request not be dead after
   all but merely slow, its final compare-and-set finds another token, its work rolls back and
   it answers 409: the work lands once either way.
5. Lost connection. A claim or work whose connection dies (a backend terminated) is resolved
   on a new connection before answering: a claim carrying our token is ours; work whose record
   is completed committed (its response is the answer, 2xx, even when the COMMIT's own answer
   was lost); otherwise the claim is freed and the answer is 503 `unavailable`, so the retry it
   asks for runs at once instead of meeting 409 until the claim goes stale. Without a key the
   work runs in one transaction whose id decides the same question (marketplace.lost_commits).

Use it on a view method and document the header with IDEMPOTENCY_KEY_PARAMETER:

    @extend_schema(parameters=[IDEMPOTENCY_KEY_PARAMETER], ...)
    @idempotent
    def create(self, request): ...
"""

from __future__ import annotations

import functools
import json
import logging
import re
import secrets
from collections.abc import Callable

from django.db import transaction
from django.http import HttpResponse
from drf_spectacular.utils import OpenApiParameter
from rest_framework import status
from rest_framework.exceptions import APIException
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from marketplace import idempotency, lost_commits
from marketplace.models import IdempotencyRecord

log = logging.getLogger(__name__)

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
# Visible ASCII only: the key is echoed in error messages and must fit the unique column.
_KEY_RE = re.compile(r"[\x21-\x7e]{1,255}")

IDEMPOTENCY_KEY_PARAMETER = OpenApiParameter(
    name=HEADER,
    # The schema states _KEY_RE, so a schema-valid key is one the view takes (Schemathesis sent
    # a schema-valid key with a control character and got a 400).
    type={"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]+$"},
    location=OpenApiParameter.HEADER,
    required=False,
    description=(
        "Optional. A client-chosen key (1-255 visible ASCII characters) that makes this request "
        "safe to retry: a retry with the same key and body returns the first successful "
        "response byte for byte and moves nothing (the replay carries "
        f"`{REPLAYED_HEADER}: true`); the same key with a different body is refused with 422; "
        "a retry while the first request is still being processed gets 409. Keys are scoped "
        "to the authenticated user and kept at least 24 hours."
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
    return idempotency.fingerprint(request.method or "", request.path, body)


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


def _shown(key: str) -> str:
    return key if len(key) <= 64 else key[:61] + "..."


def _in_flight(key: str) -> IdempotencyKeyInFlight:
    return IdempotencyKeyInFlight(
        f"a request with {HEADER} {_shown(key)!r} is still being processed; retry shortly"
    )


def _claim(user, key: str, fingerprint: str, token: str) -> tuple[IdempotencyRecord, bool]:
    """marketplace.idempotency.claim, its refusals as API errors: 422 for another request's
    key, 409 while another request holds a live claim."""
    try:
        return idempotency.claim(user, key, fingerprint, token)
    except idempotency.KeyReused:
        raise IdempotencyKeyReused(
            f"{HEADER} {_shown(key)!r} was already used for a different request; "
            "send a new key for a new request"
        ) from None
    except idempotency.KeyInFlight:
        raise _in_flight(key) from None


class _ClaimLost(Exception):
    """Our claim went stale and another request took it over: our work must not commit."""


def idempotent(handler: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Make a DRF view method honour the Idempotency-Key header (see the module docstring).

    Without the header the method runs in one transaction whose id is read first, so that a
    COMMIT whose answer is lost is resolved on a new connection (its 2xx when it committed).
    With it, the key is claimed in a committed transaction of its own, then the method runs in
    one transaction that also stores its response; a non-2xx response rolls that transaction
    back and frees the key.
    """

    @functools.wraps(handler)
    def wrapper(view, request: Request, *args, **kwargs) -> HttpResponse:
        if transaction.get_connection().in_atomic_block:
            # Inside someone's transaction (a test's, ATOMIC_REQUESTS): nothing commits here.
            return _keyed(handler, view, request, *args, **kwargs)
        if request.headers.get(HEADER) is None:
            return _unkeyed(handler, view, request, *args, **kwargs)
        return _keyed(handler, view, request, *args, **kwargs)

    return wrapper


def _unkeyed(handler, view, request: Request, *args, **kwargs) -> HttpResponse:
    """The method in one transaction; a lost COMMIT resolved by its transaction id."""
    xid = response = None
    hooks: list = []
    try:
        with transaction.atomic():
            xid = lost_commits.transaction_id()
            response = handler(view, request, *args, **kwargs)
            hooks = lost_commits.commit_hooks()
    except lost_commits.CONNECTION_LOST:
        # Only the COMMIT of a finished method is ambiguous; an error before it rolled back.
        if response is None or xid is None or not lost_commits.committed(xid):
            raise
        log.warning("COMMIT of %s %s landed, its answer was lost", request.method, request.path)
        lost_commits.run_commit_hooks(hooks)
    return response


def _keyed(handler, view, request: Request, *args, **kwargs) -> HttpResponse:
    key = request.headers.get(HEADER)
    if key is None:
        return handler(view, request, *args, **kwargs)
    if not _KEY_RE.fullmatch(key):
        raise InvalidIdempotencyKey()
    fingerprint = request_fingerprint(request)
    token = secrets.token_hex(16)
    record, claimed = _claim_resolving(request.user, key, fingerprint, token)
    if not claimed:
        return _json_response(record.status_code, record.response_body, replayed=True)
    hooks: list = []
    try:
        with transaction.atomic():
            # Marks the work running while this transaction lives, so a retry takes the claim
            # over at once if this process dies (PostgreSQL; idempotency._abandoned).
            idempotency.hold(record)
            response = handler(view, request, *args, **kwargs)
            if not 200 <= response.status_code < 300:
                transaction.set_rollback(True)
            else:
                body = _rendered_body(response)
                if not idempotency.store(record, token, response.status_code, body):
                    raise _ClaimLost()
                hooks = lost_commits.commit_hooks()
    except _ClaimLost:
        raise _in_flight(key) from None
    except lost_commits.CONNECTION_LOST:
        if transaction.get_connection().in_atomic_block:
            raise
        # The connection died: before the COMMIT (nothing stays) or in it (it may have landed).
        # The record says which, read on a new connection: completed means our work committed.
        stored = _free_resolving(record, token)
        if stored is None:
            raise
        log.warning("COMMIT of %s %s landed, its answer was lost", request.method, request.path)
        lost_commits.run_commit_hooks(hooks)
        return _json_response(stored.status_code, stored.response_body, replayed=False)
    except BaseException:
        _free(record, token)
        raise
    if not 200 <= response.status_code < 300:
        # Only successes are remembered; the key stays free for a corrected retry.
        _free(record, token)
        return response
    return _json_response(response.status_code, body, replayed=False)


def _claim_resolving(user, key: str, fingerprint: str, token: str):
    """_claim, with a COMMIT of the claim whose answer was lost resolved on a new connection:
    if the claim landed it is ours (it carries our token), else claim again. Without this the
    key stayed in flight for MOLT_IDEMPOTENCY_IN_FLIGHT_SECONDS and every retry got 409."""
    try:
        return _claim(user, key, fingerprint, token)
    except lost_commits.CONNECTION_LOST:
        if transaction.get_connection().in_atomic_block:
            raise
        mine = lost_commits.on_new_connection(
            lambda: IdempotencyRecord.objects.filter(user=user, key=key, claim=token).first()
        )
        if mine is not None:
            return mine, True
        return _claim(user, key, fingerprint, token)


def _free(record: IdempotencyRecord, token: str) -> None:
    """idempotency.free, again on a new connection if the first one died meanwhile (a key
    left in flight holds every retry off with 409 for MOLT_IDEMPOTENCY_IN_FLIGHT_SECONDS)."""
    try:
        idempotency.free(record, token)
    except lost_commits.CONNECTION_LOST:
        if transaction.get_connection().in_atomic_block:
            raise
        lost_commits.on_new_connection(lambda: idempotency.free(record, token))


def _free_resolving(record: IdempotencyRecord, token: str) -> IdempotencyRecord | None:
    """After the work's connection died: give the key back if our work did not commit (None),
    or return the record completed by our work if it did. On a new connection; the DELETE waits
    for a dying backend's row lock, so it sees the work's final outcome, never its middle."""

    def free_then_read() -> IdempotencyRecord | None:
        idempotency.free(record, token)
        return IdempotencyRecord.objects.filter(pk=record.pk).first()

    try:
        stored = lost_commits.on_new_connection(free_then_read)
    except lost_commits.CONNECTION_LOST:
        # The database is still out of reach: the claim stays in flight. Its work's lock died
        # with the connection, so on PostgreSQL the first retry once the database is back takes
        # it over (idempotency._abandoned); elsewhere when it goes stale.
        return None
    if stored is None or stored.status_code == idempotency.IN_FLIGHT:
        return None
    return stored
