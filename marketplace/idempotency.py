"""Doing a money-moving request at most once per key: the one helper behind every path that
accepts a retry (the API's Idempotency-Key header in marketplace.api.idempotency, and the
nonce of a page or admin form submitted twice).

Each key is an IdempotencyRecord, unique per (user, key): the unique constraint is what makes a
second attempt lose, whatever the timing. Two ways to use it:

- `once`: a form whose work fits in one transaction. The record is written first, completed, in
  the work's own transaction: a repeat (double click, reload, back button) hits the unique key
  and moves nothing; a failed attempt rolls the record back with the work, so it can be retried.
- `claim` / `store` / `free`: a request whose response must be replayed byte for byte (the
  API). The claim commits on its own, in flight, so a concurrent duplicate sees it at once; the
  work then stores its response by compare-and-set on the claim token (see the API module's
  docstring for the crash and take-over cases).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from marketplace.models import IdempotencyRecord

# The record's status while the first request runs (committed, so duplicates see it).
IN_FLIGHT = 0

# On PostgreSQL a claim's work marks itself running with a transaction-level advisory lock in
# this namespace (the two-int form: namespace, record id), which PostgreSQL releases when that
# transaction ends in any way, its backend's death included (`hold`, `_abandoned`).
WORK_LOCK_NAMESPACE = 0x4D4F4C54 & 0x7FFFFFFF  # "MOLT"
# A claim younger than this may be between its own commit and its work's first statement (which
# takes the lock), so its holder is not judged gone from the lock alone.
HOLD_GRACE = timedelta(seconds=5)


class AlreadyDone(Exception):
    """The key was used already: this attempt is a repeat and moved nothing."""


class KeyReused(Exception):
    """The key was used already for a different request."""


class KeyInFlight(Exception):
    """Another request holds a live claim on the key."""


def fingerprint(*parts: str) -> str:
    """SHA-256 of `parts`, each ended by a newline (so ("ab", "c") and ("a", "bc") differ)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


@contextmanager
def once(user, key: str, *, what: str) -> Iterator[None]:
    """Run the block at most once per (`user`, `key`), in one transaction with the key's
    completed record (`what` says what was done, for the admin). Raises AlreadyDone, before the
    block runs, when the key was used already; an exception from the block rolls back the
    record too, so the key stays free for a retry. Locks: the key's unique index entry (a
    concurrent attempt with the same key waits for this transaction, then gets AlreadyDone)."""
    with transaction.atomic():
        try:
            with transaction.atomic():
                IdempotencyRecord.objects.create(
                    user=user,
                    key=key,
                    fingerprint=fingerprint(what),
                    status_code=200,
                    response_body=what,
                )
        except IntegrityError:
            raise AlreadyDone(key) from None
        yield


def claim(user, key: str, request_fingerprint: str, token: str) -> tuple[IdempotencyRecord, bool]:
    """The key's record and whether this request now holds its claim (True: run the work).
    The claim commits at once, in its own transaction. Raises KeyReused for another request's
    key and KeyInFlight while another request holds a live claim. A claim older than
    MOLT_IDEMPOTENCY_IN_FLIGHT_SECONDS (its holder presumably crashed, its work uncommitted),
    or on PostgreSQL one past HOLD_GRACE whose work is not running (`_abandoned`: its holder
    was killed, or lost its connection while the database was out of reach and could not free
    it), is taken over by compare-and-set on its token, so of two retries only one does."""
    for _ in range(3):
        now = timezone.now()
        try:
            with transaction.atomic():
                record = IdempotencyRecord.objects.create(
                    user=user,
                    key=key,
                    fingerprint=request_fingerprint,
                    status_code=IN_FLIGHT,
                    response_body="",
                    claim=token,
                    claimed_at=now,
                    created_at=now,
                )
            return record, True
        except IntegrityError:
            existing = IdempotencyRecord.objects.filter(user=user, key=key).first()
        if existing is None:
            continue  # the holder failed and freed the key between our insert and our read
        if existing.fingerprint != request_fingerprint:
            raise KeyReused(key)
        if existing.status_code != IN_FLIGHT:
            return existing, False
        if not (_stale(existing.claimed_at, now) or _abandoned(existing, now)):
            raise KeyInFlight(key)
        if IdempotencyRecord.objects.filter(
            pk=existing.pk, status_code=IN_FLIGHT, claim=existing.claim
        ).update(claim=token, claimed_at=now):
            existing.claim, existing.claimed_at = token, now
            return existing, True
    raise KeyInFlight(key)


def _stale(claimed_at: datetime | None, now: datetime) -> bool:
    timeout = timedelta(seconds=settings.MOLT_IDEMPOTENCY_IN_FLIGHT_SECONDS)
    return claimed_at is None or now - claimed_at > timeout


def _work_lock(record: IdempotencyRecord) -> list[int]:
    # int4 arguments; two records 2**31 - 1 apart share a lock, which can only make a gone
    # holder look alive (409 until the claim is stale), never the reverse.
    return [WORK_LOCK_NAMESPACE, record.pk % 0x7FFFFFFF]


def hold(record: IdempotencyRecord) -> None:
    """Call first in the claim's work transaction: on PostgreSQL, mark the work as running
    until that transaction ends (commit, rollback or the backend's death), so a retry can tell
    a claim whose holder is gone from one still at work (`_abandoned`). Never waits: a lock
    held by the request this one took the claim over from only leaves the mark to it."""
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_xact_lock(%s, %s)", _work_lock(record))


def _abandoned(existing: IdempotencyRecord, now: datetime) -> bool:
    """Whether an in-flight claim's holder is gone: on PostgreSQL, past HOLD_GRACE and no
    transaction holds its work's lock. Elsewhere (SQLite: one process, no such locks) only
    staleness tells."""
    if connection.vendor != "postgresql" or existing.claimed_at is None:
        return False
    if now - existing.claimed_at < HOLD_GRACE:
        return False
    with transaction.atomic(), connection.cursor() as cursor:
        # Taken and given back with this short transaction (or the caller's).
        cursor.execute("SELECT pg_try_advisory_xact_lock(%s, %s)", _work_lock(existing))
        (free,) = cursor.fetchone()
    return bool(free)


def store(record: IdempotencyRecord, token: str, status_code: int, body: str) -> bool:
    """Complete the claim with the response, by compare-and-set on `token`; False when another
    request took the claim over meanwhile (then the caller's work must roll back). Call in the
    work's transaction, so the response and the work commit together."""
    return bool(
        IdempotencyRecord.objects.filter(pk=record.pk, status_code=IN_FLIGHT, claim=token).update(
            status_code=status_code, response_body=body, claim=""
        )
    )


def free(record: IdempotencyRecord, token: str) -> None:
    """Give the key back after a failure, unless someone else took the claim meanwhile."""
    IdempotencyRecord.objects.filter(pk=record.pk, status_code=IN_FLIGHT, claim=token).delete()


def purge_expired_keys(now: datetime | None = None) -> int:
    """Delete idempotency records older than MOLT_IDEMPOTENCY_KEY_TTL_SECONDS (at least 24 h);
    returns how many. Run hourly by the purge-idempotency-keys beat task."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.MOLT_IDEMPOTENCY_KEY_TTL_SECONDS)
    deleted, _ = IdempotencyRecord.objects.filter(created_at__lt=cutoff).delete()
    return deleted
