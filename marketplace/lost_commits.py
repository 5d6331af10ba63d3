"""Knowing whether a transaction committed when its connection died under it.

A PostgreSQL backend terminated (an operator's pg_terminate_backend, a failover, a proxy
dropping the session) while it runs COMMIT is ambiguous to the client: the commit may have
landed and only its answer been lost. The faults tier's storm saw exactly that: an order that
existed, answered 503 `unavailable`, so a client without an Idempotency-Key would order again.

The way out is PostgreSQL's own (txid_status, added in 10 for this case): the transaction reads
its id before it writes, and after a lost COMMIT a new connection asks the server what became of
that id. Elsewhere (SQLite, one process, no server to lose) there is nothing to resolve.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import TypeVar

from django.db import DatabaseError, InterfaceError, OperationalError, connection

log = logging.getLogger(__name__)
T = TypeVar("T")

# The aborting backend answers the client before it finishes its abort: a read in that instant
# sees the transaction "in progress". Its exit takes milliseconds; past this it is unknown.
_SETTLE_SECONDS = 5.0

# What a lost connection looks like through Django (the errors the API answers 503 for).
CONNECTION_LOST = (OperationalError, InterfaceError)


def transaction_id() -> int | None:
    """The current transaction's id (assigning one: the transaction is about to write anyway);
    None where the database cannot be asked later (not PostgreSQL). Call inside the atomic
    block whose COMMIT may be lost."""
    if connection.vendor != "postgresql":
        return None
    with connection.cursor() as cursor:
        cursor.execute("SELECT txid_current()")
        return cursor.fetchone()[0]


def commit_hooks() -> list:
    """The on_commit callbacks the current transaction has registered so far. Call last thing
    inside the atomic block: when its COMMIT fails Django drops them with the connection, and
    a commit that in fact landed must still run them (provisioning, the node's push) rather
    than leave them to the sweeps' next round."""
    return list(connection.run_on_commit)


def run_commit_hooks(hooks: list) -> None:
    """Run callbacks of a transaction found committed after its connection died, as Django
    would have (a robust one's exception logged, not raised)."""
    for _sids, func, robust in hooks:
        if robust:
            try:
                func()
            except Exception:
                log.exception("on_commit callback %r failed after a lost COMMIT answer", func)
        else:
            func()


def reconnect() -> None:
    """Drop this thread's connection (dead, or in an unknown state) so the next query opens a
    new one. Never inside an atomic block: there the transaction is lost with the connection
    and the block must fail."""
    with contextlib.suppress(DatabaseError):
        connection.close()


def on_new_connection(read: Callable[[], T]) -> T:
    """`read()` on a new connection, tried again on another while connections keep dying (a
    storm of terminations, a failover in progress) for up to _SETTLE_SECONDS; the last error is
    raised after that. `read` must be safe to repeat: a read, or a compare-and-set."""
    deadline = time.monotonic() + _SETTLE_SECONDS
    while True:
        reconnect()
        try:
            return read()
        except CONNECTION_LOST:
            if time.monotonic() > deadline:
                reconnect()
                raise
            time.sleep(0.05)


def committed(xid: int) -> bool | None:
    """Whether transaction `xid`, whose connection died, committed: True or False, or None when
    the server cannot tell (it cannot be reached, or the transaction is still settling after
    _SETTLE_SECONDS). Opens a new connection; call outside any atomic block."""

    def status() -> str | None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT txid_status(%s)", [xid])
            return cursor.fetchone()[0]

    deadline = time.monotonic() + _SETTLE_SECONDS
    try:
        while True:
            found = on_new_connection(status)
            if found == "committed":
                return True
            if found == "aborted":
                return False
            # "in progress" (its backend still aborting) or NULL (too old: never a fresh id).
            if found is None or time.monotonic() > deadline:
                return None
            time.sleep(0.05)
    except CONNECTION_LOST as exc:
        log.warning("could not learn whether transaction %s committed: %s", xid, exc)
        return None
