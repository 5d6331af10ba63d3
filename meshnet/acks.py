"""Agents' acknowledgements, recorded in batches on a thread of their own (issue 14).

A change that touches every node is acknowledged by every agent within a few milliseconds;
one at a time (about eight statements each, on the threads the agents' metering and inventory
also use) 1,000 acks took seconds to record. Here each connection hands its ack to its event
loop's AckBatcher and waits for the outcome, so a connection's frames still run one at a time
and in order; the batcher records whatever acks are waiting in one thread hop (group commit:
a lone ack goes at once, the acks that arrive meanwhile go together in the next batch), on
one thread that nothing else uses, so an ack never queues behind other agents' heartbeats,
metering or inventory.

An ack of a node with nothing to settle (no peer being added or removed, no retired key still
open: the common case of a change that touches every node) is one row of a single UPDATE,
under the node rows' locks (taken in id order, as every multi-node lock in meshnet). Anything
else goes through meshnet.agent_channel.acknowledge_revision as before, each in its own
transaction after the batch's: peers activated or removed, keys closed, signals sent. The
heartbeats an ack must write before it (meshnet.liveness: a silence it ends is an outage
first) are written for the whole batch in one statement before any of its acks. Nothing
is recorded that the one-at-a-time path would not record, nor left out: the outcome of each
ack (None, or the AgentRefused its connection closes with) is the same.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from channels.db import database_sync_to_async
from clawnode import wire
from django.db import transaction

from meshnet import agent_channel, liveness
from meshnet.agent_channel import AgentRefused
from meshnet.models import JobPeer, JobPeerKey, Node

log = logging.getLogger(__name__)

# Acks recorded in one batch at most: one transaction's locks held a few milliseconds.
MAX_BATCH = 500


@dataclass
class PendingAck:
    """An ack frame of `node`'s connection, and the heartbeats it must write first (the Beat
    that liveness.HeartbeatBatcher.before_settling returned, or None)."""

    node: Node
    envelope: Any
    beat: liveness.Beat | None = None


def record_acks(acks: Sequence[PendingAck]) -> list[Exception | None]:
    """Record `acks` (see the module's docstring); for each, None or the exception its
    connection would have had one at a time (AgentRefused: revoked, a bad signature, a
    revision ahead of the desired one)."""
    outcome: list[Exception | None] = [None] * len(acks)
    checked: dict[int, agent_channel.CheckedAck] = {}
    one_by_one: list[int] = []
    simple: dict[int, int] = {}  # node pk -> index of its ack
    settled = _settle_beats(acks)
    for i, ack in enumerate(acks):
        if ack.beat is not None and not settled:
            # Its heartbeats are written before anything else of it, as one at a time.
            one_by_one.append(i)
            continue
        try:
            checked[i] = agent_channel.check_ack(ack.node, ack.envelope)
        except AgentRefused as exc:
            outcome[i] = exc
            continue
        if checked[i].failed or checked[i].removing or ack.node.pk in simple:
            one_by_one.append(i)
        else:
            simple[ack.node.pk] = i
    if simple:
        try:
            one_by_one += _record_simple(acks, checked, simple, outcome)
        except Exception as exc:
            log.exception("recording a batch of %d acks failed", len(simple))
            for i in simple.values():
                outcome[i] = exc
    for i in sorted(one_by_one):
        try:
            _record_one(acks[i], checked.get(i))
        except Exception as exc:  # AgentRefused, or the database's: this ack's alone
            outcome[i] = exc
    return outcome


def _settle_beats(acks: Sequence[PendingAck]) -> bool:
    """Write the heartbeats the acks carry (liveness.settle_pending's job, for all of them in
    one statement) before anything else of them, as one at a time; False when that failed
    and each ack's are left to _record_one."""
    beats: dict[int, liveness.Beat] = {}
    for ack in acks:
        if ack.beat is not None:
            known = beats.get(ack.node.pk)
            beats[ack.node.pk] = ack.beat if known is None else known.merged(ack.beat)
    if not beats:
        return True
    try:
        liveness.record_heartbeats(beats, skip_locked=False)
    except Exception:
        log.warning("heartbeats of %d acks not written together", len(beats), exc_info=True)
        return False
    return True


def _record_simple(
    acks: Sequence[PendingAck],
    checked: dict[int, agent_channel.CheckedAck],
    simple: dict[int, int],
    outcome: list[Exception | None],
) -> list[int]:
    """One transaction for the acks in `simple` (one per node): nodes revoked meanwhile and
    revisions ahead of the desired one are refused, the acks of nodes with something to settle
    are returned for _record_one, the others' acked_revision moves forward in one UPDATE."""
    with transaction.atomic():
        rows = {
            pk: (desired, acked, revoked_at)
            for pk, desired, acked, revoked_at in Node.objects.select_for_update()
            .filter(pk__in=list(simple))
            .order_by("pk")
            .values_list("pk", "desired_revision", "acked_revision", "revoked_at")
        }
        # What acknowledge_revision would settle: peers being added or removed, keys retired
        # by a re-key and not yet closed. Read under the node locks, which every write that
        # creates them takes first (meshnet.peers).
        busy = set(
            JobPeer.objects.filter(
                node_id__in=list(rows),
                state__in=[JobPeer.State.DESIRED, JobPeer.State.REMOVING],
            ).values_list("node_id", flat=True)
        ) | set(
            JobPeerKey.objects.filter(
                job_peer__node_id__in=list(rows),
                retired_revision__isnull=False,
                closed_at__isnull=True,
            ).values_list("job_peer__node_id", flat=True)
        )
        later: list[int] = []
        moved: dict[int, list[int]] = {}  # revision -> the node pks it moves forward
        for pk, i in simple.items():
            revision = checked[i].revision
            row = rows.get(pk)
            if row is None or row[2] is not None:
                outcome[i] = AgentRefused("node revoked", wire.CLOSE_FORBIDDEN)
            elif pk in busy:
                later.append(i)
            elif revision > row[0]:
                outcome[i] = AgentRefused(
                    f"acknowledged revision {revision} is ahead of desired revision {row[0]}",
                    wire.CLOSE_BAD_MESSAGE,
                )
            elif revision > row[1]:
                moved.setdefault(revision, []).append(pk)
        # One UPDATE per revision acked (a change to every node: one), not bulk_update's
        # CASE of a row each, whose building was most of a batch's time in the web process.
        for revision, pks in moved.items():
            Node.objects.filter(pk__in=pks).update(acked_revision=revision)
    return later


def _record_one(ack: PendingAck, checked: agent_channel.CheckedAck | None) -> None:
    """One ack as the agent channel records it alone: refused if the node was revoked
    meanwhile, its heartbeats written first, then verified (unless `checked` already) and
    recorded."""
    revoked_at = list(Node.objects.filter(pk=ack.node.pk).values_list("revoked_at", flat=True))
    if revoked_at != [None]:  # gone, or revoked
        raise AgentRefused("node revoked", wire.CLOSE_FORBIDDEN)
    if ack.beat is not None and checked is None:  # not written with the batch's
        liveness.settle_pending(ack.beat)
    if checked is None:
        checked = agent_channel.check_ack(ack.node, ack.envelope)
    agent_channel.record_checked_ack(ack.node, checked)


# One thread: batches run one at a time, and never on the threads of the agents' other frames
# (meshnet.consumers) or of the heartbeat flush (meshnet.liveness).
_ack_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="molt-acks")


class AckBatcher:
    """The acks one event loop's agent connections handed in, not yet recorded."""

    def __init__(self) -> None:
        self.waiting: list[tuple[PendingAck, asyncio.Future]] = []
        self._runner: asyncio.Task | None = None

    async def record(self, ack: PendingAck) -> None:
        """Record `ack` with whatever others are waiting; raises what recording it raised."""
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((ack, future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.ensure_future(self._run())
        await future

    async def _run(self) -> None:
        while self.waiting:
            batch, self.waiting = self.waiting[:MAX_BATCH], self.waiting[MAX_BATCH:]
            try:
                outcomes = await database_sync_to_async(
                    record_acks, thread_sensitive=False, executor=_ack_executor
                )([ack for ack, _ in batch])
            except Exception as exc:
                log.exception("recording %d acks failed", len(batch))
                outcomes = [exc] * len(batch)
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():  # its connection went away meanwhile
                    continue
                if outcome is None:
                    future.set_result(None)
                else:
                    future.set_exception(outcome)


_batchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AckBatcher] = (
    weakref.WeakKeyDictionary()
)


def batcher() -> AckBatcher:
    """The running event loop's batcher (a web process has one loop; tests make many)."""
    loop = asyncio.get_running_loop()
    found = _batchers.get(loop)
    if found is None:
        found = _batchers[loop] = AckBatcher()
    return found


def close_ack_connection() -> None:
    """Close the ack thread's persistent database connection (a test database is dropped)."""
    liveness.close_thread_connections(_ack_executor, 1)
