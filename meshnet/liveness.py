"""Agents' heartbeats, gathered in the web process and written in batches (issue 14).

A heartbeat frame costs no database work on the frame's path: the connection notes it in its
event loop's HeartbeatBatcher, and every MOLT_HEARTBEAT_FLUSH_SECONDS one flush writes all the
nodes heard since the last one (record_heartbeats: one locking read, one UPDATE, one INSERT of
outages), on a thread of its own, so no agent's ack or metering frame queues behind it.

Outage accounting stays exact. Each pending entry keeps the node's first and last heartbeat
since the last flush, and any silence longer than MOLT_NODE_OFFLINE_AFTER_SECONDS between two of
its heartbeats (a flush delayed that long); a flush records, as meshnet.nodes.record_heartbeat
would have, an outage from the stored last_seen_at to the first heartbeat when that gap is over
the limit, and one for each such inner silence. A message that can settle an order (ack,
removed, sandbox_status) first writes its node's pending heartbeats and the present moment,
synchronously, on the message's own path (settle_pending): a silence that ended is an outage
in the database before the message is processed, as before batching.

What a crash (SIGKILL, power) loses: the heartbeats of the last flush interval, nothing else.
Such a node's last_seen_at is then up to MOLT_HEARTBEAT_FLUSH_SECONDS behind; when it is heard
from again, the outage (if the silence passes the limit) starts that much earlier, so a buyer
is billed at most that many seconds less; an order on it is ended at most that much earlier by
the failure grace. A clean shutdown loses nothing: each connection's close flushes.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from meshnet.models import Node, NodeOutage
from meshnet.signals import node_changed

log = logging.getLogger(__name__)


@dataclass
class Beat:
    """A node's heartbeats not yet written: the first and the last, the address they came
    from, and the silences over the offline limit between them (start, end)."""

    node: Node
    first: datetime
    last: datetime
    observed_ip: str | None = None
    silences: list[tuple[datetime, datetime]] = field(default_factory=list)

    def add(self, at: datetime, observed_ip: str | None) -> None:
        if at > self.last:
            if (at - self.last).total_seconds() > settings.MOLT_NODE_OFFLINE_AFTER_SECONDS:
                self.silences.append((self.last, at))
            self.last = at
        elif at < self.first:
            self.first = at
        if observed_ip:
            self.observed_ip = observed_ip

    def merged(self, other: Beat) -> Beat:
        """This entry and `other` (an earlier or later one of the same node) as one."""
        first, second = sorted((self, other), key=lambda b: b.first)
        beat = Beat(
            self.node,
            first.first,
            first.last,
            first.observed_ip,
            [*first.silences, *second.silences],
        )
        for at in (second.first, second.last):
            beat.add(at, None)
        beat.observed_ip = second.observed_ip or first.observed_ip
        return beat


def record_heartbeats(beats: Mapping[int, Beat], *, skip_locked: bool = True) -> dict[str, set]:
    """Write the heartbeats of many nodes in one transaction: last_seen_at moves forward to
    each node's last heartbeat (never back), observed_ip to the one it came from, and outages
    are recorded as meshnet.nodes.record_heartbeat records them (see the module's docstring).

    Node rows are locked in id order; with `skip_locked` a row another transaction holds (an
    ack, a revocation) is left out and named in "skipped" for the next flush, so a flush never
    waits. Revoked nodes are named in "revoked" (their connections are closed) and not written.
    Owners' pages hear of a node that comes back online or from a new address."""
    offline = timedelta(seconds=settings.MOLT_NODE_OFFLINE_AFTER_SECONDS)
    revoked: set[int] = set()
    updates: list[tuple[int, datetime, str | None]] = []
    outages: list[NodeOutage] = []
    announce: list[Node] = []
    with transaction.atomic():
        rows = {
            pk: (last_seen_at, observed_ip, revoked_at)
            for pk, last_seen_at, observed_ip, revoked_at in _lock_rows(list(beats), skip_locked)
        }
        for pk, (previous, ip_before, revoked_at) in rows.items():
            beat = beats[pk]
            if revoked_at is not None:
                revoked.add(pk)
                continue
            if previous is not None and beat.first - previous > offline:
                outages.append(NodeOutage(node_id=pk, started_at=previous, ended_at=beat.first))
            outages.extend(
                NodeOutage(node_id=pk, started_at=start, ended_at=end)
                for start, end in beat.silences
                if previous is None or start >= previous
            )
            seen = beat.last if previous is None or beat.last > previous else previous
            ip = beat.observed_ip or ip_before
            updates.append((pk, seen, ip))
            came_back = previous is None or beat.first - previous > offline
            if came_back or (beat.observed_ip and beat.observed_ip != ip_before):
                beat.node.last_seen_at, beat.node.observed_ip = seen, ip
                announce.append(beat.node)
        if updates:
            _write_seen(updates)
        if outages:
            NodeOutage.objects.bulk_create(outages)
        for node in announce:
            node_changed.send(sender=Node, node=node, change="online")
    return {"revoked": revoked, "skipped": set(beats) - set(rows)}


# On PostgreSQL the flush's two statements take each column as one array parameter, whatever
# the number of nodes: with a placeholder per node and column (`pk IN (...)`, a VALUES list), a
# flush of 1,000 nodes' heartbeats every 5 s was a tenth of the web process's CPU with idle
# agents, most of it the driver scanning and quoting the query text (py-spy,
# benchmarks/agent_plane.py). Only quoted names of this model and placeholders go into the text.


def _columns() -> tuple[str, str, str, str, str]:
    quote = connection.ops.quote_name
    fields = ("id", "last_seen_at", "observed_ip", "revoked_at")
    return quote(Node._meta.db_table), *(quote(Node._meta.get_field(f).column) for f in fields)


def _lock_rows(pks: list[int], skip_locked: bool) -> list[tuple[int, Any, Any, Any]]:
    """(pk, last_seen_at, observed_ip, revoked_at) of the nodes `pks`, locked in id order."""
    if connection.vendor != "postgresql":
        return list(
            Node.objects.select_for_update(skip_locked=skip_locked)
            .filter(pk__in=pks)
            .order_by("pk")
            .values_list("pk", "last_seen_at", "observed_ip", "revoked_at")
        )
    table, pk, seen, ip, revoked = _columns()
    skip = " SKIP LOCKED" if skip_locked else ""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {pk}, {seen}, {ip}, {revoked} FROM {table} "  # noqa: S608
            f"WHERE {pk} = ANY(%s::bigint[]) ORDER BY {pk} FOR UPDATE{skip}",
            [pks],
        )
        return cursor.fetchall()


def _write_seen(updates: list[tuple[int, datetime, str | None]]) -> None:
    """Set (node pk, last_seen_at, observed_ip) of each row: on PostgreSQL one UPDATE from
    arrays (bulk_update's CASE with a branch per row and field took most of a batch's time in
    the web process to build)."""
    if connection.vendor != "postgresql":
        Node.objects.bulk_update(
            [Node(pk=pk, last_seen_at=seen, observed_ip=ip) for pk, seen, ip in updates],
            ["last_seen_at", "observed_ip"],
            batch_size=500,
        )
        return
    table, pk, seen, ip, _revoked = _columns()
    pks, seens, ips = (list(column) for column in zip(*updates, strict=True))
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET {seen} = v.seen, {ip} = v.ip "  # noqa: S608
            f"FROM unnest(%s::bigint[], %s::timestamptz[], %s::inet[]) AS v(pk, seen, ip) "
            f"WHERE {table}.{pk} = v.pk",
            [pks, seens, ips],
        )


# One thread for the flushes: their transactions never run on (nor wait for) the thread the
# agents' other frames use, and never two at once.
_flush_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="molt-heartbeats")


class HeartbeatBatcher:
    """The heartbeats one event loop's agent connections received, not yet written."""

    def __init__(self) -> None:
        self.pending: dict[int, Beat] = {}
        self.in_flight: dict[int, Beat] = {}
        # Per node, a time its last_seen_at in the database is known to be at or after (it
        # never moves back): what this process wrote, or read at the agent's auth.
        self.written: dict[int, datetime] = {}
        self.sockets: dict[int, set[Any]] = {}
        self._flusher: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    def join(self, node: Node, socket: Any) -> None:
        """`socket` (an AgentConsumer) speaks for `node`: it is closed if a flush finds the
        node revoked."""
        self.sockets.setdefault(node.pk, set()).add(socket)
        self._note_written(node.pk, node.last_seen_at)
        self._start()

    def _note_written(self, pk: int, at: datetime | None) -> None:
        if at is not None and (pk not in self.written or at > self.written[pk]):
            self.written[pk] = at

    def leave(self, node: Node, socket: Any) -> None:
        sockets = self.sockets.get(node.pk)
        if sockets is not None:
            sockets.discard(socket)
            if not sockets:
                del self.sockets[node.pk]
                self.written.pop(node.pk, None)

    def beat(self, node: Node, observed_ip: str | None, at: datetime | None = None) -> None:
        """Note a heartbeat of `node` (now, or at `at`); written by the next flush."""
        at = at or timezone.now()
        entry = self.pending.get(node.pk)
        if entry is None:
            self.pending[node.pk] = Beat(node, at, at, observed_ip)
        else:
            entry.node = node
            entry.add(at, observed_ip)
        self._start()

    def before_settling(
        self, node: Node, observed_ip: str | None, at: datetime | None = None
    ) -> Beat | None:
        """What a message that can settle an order must write first: None when no heartbeat
        of this node that waits for a flush can end an outage (its first is within the offline
        limit of what the database is known to hold, with no silence inside it), and the
        message's own heartbeat joins the batch; else the heartbeats to write (take)."""
        at = at or timezone.now()
        known = self.written.get(node.pk)
        limit = timedelta(seconds=settings.MOLT_NODE_OFFLINE_AFTER_SECONDS)
        waiting = [b for b in (self.in_flight.get(node.pk), self.pending.get(node.pk)) if b]
        first = min([b.first for b in waiting] + [at])
        if known is not None and first - known <= limit and not any(b.silences for b in waiting):
            # The message's own moment is no outage's end either: the batch takes it.
            self.beat(node, observed_ip, at)
            return None
        return self.take(node, observed_ip, at)

    def take(self, node: Node, observed_ip: str | None, at: datetime | None = None) -> Beat:
        """The node's pending heartbeats (and those of a flush under way) with one at `at`
        (default now), removed from the batch, for the caller to write itself before a message
        that can settle an order (settle_pending). A flush under way that writes the same
        heartbeats finds them older than what the caller wrote and records nothing twice."""
        at = at or timezone.now()
        beat = Beat(node, at, at, observed_ip)
        pending = self.pending.pop(node.pk, None)
        if pending is not None:
            beat = pending.merged(beat)
        in_flight = self.in_flight.get(node.pk)
        if in_flight is not None:
            beat = in_flight.merged(beat)
        beat.node = node
        return beat

    def settled(self, node: Node, beat: Beat) -> None:
        """`beat` was written on a message's path (settle_pending)."""
        self._note_written(node.pk, beat.last)

    async def flush(self) -> None:
        """Write every pending heartbeat now (one at a time: a second caller waits for the
        flush under way, then writes what came after it)."""
        async with self._lock:
            if not self.pending:
                return
            batch, self.pending = self.pending, {}
            self.in_flight = batch
            try:
                outcome = await database_sync_to_async(
                    record_heartbeats, thread_sensitive=False, executor=_flush_executor
                )(batch)
            except Exception:
                log.exception("heartbeat flush failed; %d node(s) kept for the next", len(batch))
                outcome = {"revoked": set(), "skipped": set(batch)}
            finally:
                self.in_flight = {}
            for pk in outcome["skipped"]:
                later = self.pending.get(pk)
                self.pending[pk] = batch[pk] if later is None else batch[pk].merged(later)
            for pk, beat in batch.items():
                written = pk not in outcome["skipped"] and pk not in outcome["revoked"]
                if written and pk in self.sockets:
                    self._note_written(pk, beat.last)
        for pk in outcome["revoked"]:
            for socket in list(self.sockets.get(pk, ())):
                await socket.node_revoked({"type": "node.revoked"})

    def _start(self) -> None:
        if self._flusher is None or self._flusher.done():
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return  # used outside a loop (a test's own batcher): flushed by hand
            self._flusher = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        # Runs while a connection is open or a heartbeat is pending; the next join restarts it.
        while self.sockets or self.pending:
            await asyncio.sleep(settings.MOLT_HEARTBEAT_FLUSH_SECONDS)
            await self.flush()


_batchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, HeartbeatBatcher] = (
    weakref.WeakKeyDictionary()
)


def batcher() -> HeartbeatBatcher:
    """The running event loop's batcher (a web process has one loop; tests make many)."""
    loop = asyncio.get_running_loop()
    found = _batchers.get(loop)
    if found is None:
        found = _batchers[loop] = HeartbeatBatcher()
    return found


def settle_pending(beat: Beat) -> None:
    """Write `beat` (from HeartbeatBatcher.take) before a message that can settle an order,
    waiting for the node's row if a flush holds it. Call in the message's own thread."""
    record_heartbeats({beat.node.pk: beat}, skip_locked=False)


def close_thread_connections(executor: ThreadPoolExecutor, threads: int) -> None:
    """Close the database connections (kept open by CONN_MAX_AGE) of every thread of
    `executor`, which has at most `threads`: for a test database that is about to be dropped.
    A barrier makes each of the `threads` tasks run on a thread of its own."""
    import threading

    from django.db import connections

    barrier = threading.Barrier(threads, timeout=10)

    def close() -> None:
        connections.close_all()
        barrier.wait()

    for future in [executor.submit(close) for _ in range(threads)]:
        future.result()


def close_flush_connection() -> None:
    close_thread_connections(_flush_executor, 1)
