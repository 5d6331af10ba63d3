"""Enqueueing a Celery task once the transaction that needs it commits, without letting a broker
outage turn a committed write into an error.

The database is the outbox: every task enqueued here re-drives state the database already
holds (a pending order, a node whose acknowledged revision lags its desired one), and a beat
sweep finds that state again (marketplace.tasks.sweep_pending_orders, meshnet.tasks'
re-push of lagging nodes). So when the broker cannot take the message, the write stands, the
client gets its normal answer, the failure is logged, and the sweep does the work late instead
of never. Issue 15 saw `POST /orders/` answer 500 with the order and its hold committed: a
retrying client would have booked twice.
"""

from __future__ import annotations

import logging
from typing import Any

from django.db import transaction
from kombu.exceptions import OperationalError

log = logging.getLogger(__name__)

# What publishing raises when the broker is down or unreachable.
BROKER_DOWN = (OperationalError, ConnectionError, TimeoutError, OSError)


def enqueue_on_commit(task: Any, *args: Any, swept_by: str) -> None:
    """`task.delay(*args)` after the current transaction commits; a broker failure is logged
    (naming `swept_by`, the sweep that will re-drive the work) and swallowed."""

    def send() -> None:
        try:
            task.delay(*args)
        except BROKER_DOWN as exc:
            log.warning(
                "broker unavailable, %s%s not enqueued (%s: %s); %s will re-drive it",
                task.name,
                args,
                type(exc).__name__,
                exc,
                swept_by,
            )

    transaction.on_commit(send)
