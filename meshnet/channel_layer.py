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


def group_send_on_commit(group: str, message: dict[str, Any], *, merge_on: str = "") -> None:
    """Send `message` to `group` after the current transaction commits (a rolled back change is
    never announced), at most once (the channel layer may drop it), and never failing the write
    that already committed: whoever misses a message catches up from the database (a page on
    reload, an agent on reconnect).

    From a thread that serves an event loop (the web process's database threads), the sends of
    a transaction are handed to that loop together once it commits, and not waited for
    (Announcements): the thread goes back to its queue of agents' frames at once. There, with
    `merge_on` (a key of `message`), messages to the same group waiting together that differ
    only in that key's value go as one message listing the values under `merge_on + "s"` (a
    heartbeat flush that finds 2,000 nodes of one owner back online: one message, not 2,000).
    Others go as they are, each one."""
    loop = _serving_an_event_loop()
    if loop is not None:
        connection = transaction.get_connection()
        hooks = connection.run_on_commit if connection.in_atomic_block else []
        # The transaction's last hook is a hand-over of the same savepoint: one more message
        # for it (a savepoint rolled back drops its hooks, and so its messages, whole).
        last = hooks[-1] if hooks else None
        handover = getattr(last[1], "__self__", None) if last is not None else None
        if (
            isinstance(handover, _Handover)
            and not handover.sent
            and last[0] == set(connection.savepoint_ids)
        ):
            handover.items.append((group, message, merge_on))
            return
        handover = _Handover(loop)
        handover.items.append((group, message, merge_on))
        transaction.on_commit(handover.send, robust=True)
        return

    def send() -> None:
        layer = get_channel_layer()
        if layer is None:
            return
        _send_now(layer, group, message)

    transaction.on_commit(send, robust=True)


def _send_now(layer: Any, group: str, message: dict[str, Any]) -> None:
    try:
        async_to_sync(layer.group_send)(group, message)
    except Exception:
        log.warning("could not send %s to group %s", message.get("type"), group, exc_info=True)


class _Handover:
    """The group sends of one transaction, handed to the event loop of the thread that made
    them when it commits."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: list[tuple[str, dict[str, Any], str]] = []
        # Ran already (a test's capture of on-commit hooks runs them and leaves them listed):
        # what comes after goes in a hand-over of its own.
        self.sent = False

    def send(self) -> None:
        self.sent = True
        layer = get_channel_layer()
        if layer is None:
            return
        if self.loop.is_running():
            try:
                self.loop.call_soon_threadsafe(_announce, layer, self.items)
                return
            except RuntimeError:  # closed meanwhile
                pass
        for group, message, _merge_on in self.items:
            _send_now(layer, group, message)


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


class Announcements:
    """Group sends handed over by group_send_on_commit on one event loop, sent by one task of
    their own: those that arrive while it sends wait and go together next (group commit, as
    meshnet.acks), merged (group_send_on_commit). Each group_send through async_to_sync held a
    database thread while Redis answered: with 2,000 idle agents, owners' pages told of nodes
    online or with new readings were 13-15% of the web process's CPU (py-spy,
    benchmarks/agent_plane.py)."""

    def __init__(self) -> None:
        self.waiting: list[tuple[Any, str, dict[str, Any], str]] = []
        self._runner: asyncio.Task | None = None

    def add(self, layer: Any, items: list[tuple[str, dict[str, Any], str]]) -> None:
        """Queue (group, message, merge_on) sends (on the loop's own thread)."""
        self.waiting.extend((layer, group, message, merge_on) for group, message, merge_on in items)
        if self._runner is None or self._runner.done():
            self._runner = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while self.waiting:
            batch, self.waiting = self.waiting, []
            await asyncio.gather(
                *(_send_one(layer, group, message) for layer, group, message in merged(batch))
            )


def merged(
    batch: list[tuple[Any, str, dict[str, Any], str]],
) -> list[tuple[Any, str, dict[str, Any]]]:
    """(layer, group, message) to send for `batch`, in the order of each one's first entry:
    messages with a `merge_on` key to one group that differ only in its value as one message
    with the values, in order and each once, under `merge_on + "s"` (a message alone keeps its
    own form); every other message as it is."""
    out: dict[tuple, tuple[Any, str, dict[str, Any], str, list]] = {}
    for layer, group, message, merge_on in batch:
        if merge_on and merge_on in message:
            rest = tuple(sorted((k, repr(v)) for k, v in message.items() if k != merge_on))
            key: tuple = (id(layer), group, merge_on, rest)
        else:  # sent as it is, however many equal ones wait
            key = (len(out),)
        entry = out.get(key)
        if entry is None:
            out[key] = (layer, group, message, merge_on, [message.get(merge_on)])
        elif merge_on and message[merge_on] not in entry[4]:
            entry[4].append(message[merge_on])
    sends = []
    for layer, group, message, merge_on, values in out.values():
        if len(values) > 1:
            message = {k: v for k, v in message.items() if k != merge_on}
            message[merge_on + "s"] = values
        sends.append((layer, group, message))
    return sends


def _announce(layer: Any, items: list[tuple[str, dict[str, Any], str]]) -> None:
    announcements(asyncio.get_running_loop()).add(layer, items)


_announcements: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Announcements] = (
    weakref.WeakKeyDictionary()
)


def announcements(loop: asyncio.AbstractEventLoop) -> Announcements:
    """`loop`'s Announcements (a web process has one loop; tests make many)."""
    found = _announcements.get(loop)
    if found is None:
        found = _announcements[loop] = Announcements()
    return found
