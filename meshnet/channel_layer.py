"""The one way the gateway sends to a Channels group from a write path: after commit.

meshnet uses it for its own channel to an agent (meshnet.nodes: `node.revoked` to the node's
group); frontend.realtime uses it for the browser pages. It lives here, in the lowest app, so
that both reach it without meshnet importing anything above it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterable
from typing import Any

from asgiref.sync import SyncToAsync, async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

log = logging.getLogger(__name__)


def group_send_on_commit(group: str, message: dict[str, Any]) -> None:
    """Send `message` to `group` after the current transaction commits (a rolled back change is
    never announced), at most once (the channel layer may drop it), and never failing the write
    that already committed: whoever misses a message catches up from the database (a page on
    reload, an agent on reconnect)."""

    def send() -> None:
        layer = get_channel_layer()
        if layer is None:
            return
        try:
            async_to_sync(layer.group_send)(group, message)
        except Exception:
            log.warning("could not send %s to group %s", message.get("type"), group, exc_info=True)

    transaction.on_commit(send, robust=True)


class _SenderLoop:
    """An event loop on a thread of its own, for code outside any event loop (a Celery worker)
    to send on: the channel layer keeps its Redis connections per loop, so sends through this
    one reuse them from one task run to the next, where async_to_sync made a new loop (and a
    new connection) per call: about 7 ms per node, 14 s for 2,000 nodes (issue 14). Started
    on first use in each process (a forked worker does not inherit the thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            alive = self._thread is not None and self._thread.is_alive()
            if self._loop is None or self._pid != os.getpid() or not alive:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=self._loop.run_forever, name="molt-channel-layer", daemon=True
                )
                self._thread.start()
                self._pid = os.getpid()
            return self._loop


_sender = _SenderLoop()

# Group sends in flight at once in send_many: enough to keep Redis busy, few enough to bound
# the sockets and memory one batch takes.
SEND_CONCURRENCY = 100
SEND_TIMEOUT_SECONDS = 60


def send_many(messages: Iterable[tuple[str, dict[str, Any]]]) -> list[bool]:
    """Send each (group, message) now over the channel layer's persistent connections; returns
    whether each was sent, in order. At most once each, as group_send_on_commit: a failure is
    logged and skipped (the database holds the truth; its sweep re-drives it).

    `messages` is consumed lazily, each message on its way as soon as it is made, while the
    caller makes the next (a push reads and signs a chunk of nodes' states per message): the
    first agents of a change to 2,000 nodes get theirs before the last state is signed.

    Called from a thread that serves an event loop (the web process's database threads), the
    sends run on that loop, whose connections persist already; anywhere else (a Celery
    worker), on this process's sender loop."""
    layer = get_channel_layer()
    if layer is None:
        return []
    loop = _serving_an_event_loop() or _sender.loop()
    futures = [
        asyncio.run_coroutine_threadsafe(_send_one(layer, group, message), loop)
        for group, message in messages
    ]
    deadline = time.monotonic() + SEND_TIMEOUT_SECONDS
    return [f.result(timeout=max(0.0, deadline - time.monotonic())) for f in futures]


_gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


async def _send_one(layer: Any, group: str, message: dict[str, Any]) -> bool:
    # One gate per loop, shared by every send in flight on it: SEND_CONCURRENCY at most.
    loop = asyncio.get_running_loop()
    gate = _gates.get(loop)
    if gate is None:
        gate = _gates[loop] = asyncio.Semaphore(SEND_CONCURRENCY)
    async with gate:
        try:
            await layer.group_send(group, message)
            return True
        except Exception:
            log.warning("could not send %s to group %s", message.get("type"), group, exc_info=True)
            return False


def _serving_an_event_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop of this process that this thread runs sync code for (asgiref's
    SyncToAsync marks it so, as AsyncToSync itself tells), or None."""
    local = SyncToAsync.threadlocal
    loop = getattr(local, "main_event_loop", None)
    if (
        loop is not None
        and getattr(local, "main_event_loop_pid", None) == os.getpid()
        and loop.is_running()
    ):
        return loop
    return None
