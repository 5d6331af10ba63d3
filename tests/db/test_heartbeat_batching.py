"""Heartbeats written in batches (meshnet.liveness, issue 14) record exactly the outages that
one write per heartbeat recorded; a message that can settle an order writes its node's pending
heartbeats first; a clean close loses nothing; a revocation the group message did not deliver
is found by the next flush. The consumer is driven through config.asgi's application."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from clawnode import wire
from django.db import OperationalError
from django.utils import timezone

from marketplace.demo_data import enrol_node
from meshnet import liveness
from meshnet.liveness import Beat, HeartbeatBatcher, record_heartbeats, settle_pending
from meshnet.models import Node, NodeOutage
from meshnet.nodes import record_heartbeat
from tests import factories

# The flush runs on its own thread (its own connection): the rows must be committed.
pytestmark = [pytest.mark.db, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def agent(provider):
    node, identity = enrol_node(
        provider, hostname="hb", gpus=[factories.gpu(0)], observed_ip="203.0.113.20"
    )
    return node, identity


@pytest.fixture
def quiet(settings):
    """An in-memory channel layer, and no periodic flush within a test's life: what is
    written, the test's own flush or the path under test wrote."""
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    settings.MOLT_HEARTBEAT_FLUSH_SECONDS = 3600
    return settings


def outages(node):
    return list(
        NodeOutage.objects.filter(node=node)
        .order_by("started_at")
        .values_list("started_at", "ended_at")
    )


def test_a_batch_records_the_outages_one_write_per_heartbeat_records(agent, settings):
    node, _ = agent
    limit = settings.MOLT_NODE_OFFLINE_AFTER_SECONDS
    t0 = timezone.now() - timedelta(hours=1)
    record_heartbeat(Node.objects.get(pk=node.pk), at=t0)
    back = t0 + timedelta(seconds=limit + 30)
    beat = Beat(node, back, back, "198.51.100.7")
    beat.add(back + timedelta(seconds=5), None)
    # A flush held up past the limit: the silence inside the batch is an outage too.
    again = back + timedelta(seconds=5 + limit + 1)
    beat.add(again, None)
    beat.add(again + timedelta(seconds=5), None)

    record_heartbeats({node.pk: beat})

    assert outages(node) == [(t0, back), (back + timedelta(seconds=5), again)]
    fresh = Node.objects.get(pk=node.pk)
    assert fresh.last_seen_at == again + timedelta(seconds=5)
    assert fresh.observed_ip == "198.51.100.7"
    # A batch from before moves nothing back and records nothing.
    late = t0 + timedelta(seconds=10)
    record_heartbeats({node.pk: Beat(node, late, late, None)})
    assert Node.objects.get(pk=node.pk).last_seen_at == again + timedelta(seconds=5)
    assert len(outages(node)) == 2


def test_a_silence_just_within_the_limit_is_no_outage(agent, settings):
    node, _ = agent
    t0 = timezone.now() - timedelta(hours=1)
    record_heartbeat(Node.objects.get(pk=node.pk), at=t0)
    at = t0 + timedelta(seconds=settings.MOLT_NODE_OFFLINE_AFTER_SECONDS)
    record_heartbeats({node.pk: Beat(node, at, at, None)})
    assert outages(node) == []
    assert Node.objects.get(pk=node.pk).last_seen_at == at


def test_settling_and_a_flush_under_way_record_one_outage_in_either_order(agent, settings):
    """An ack takes the node's heartbeats from a flush under way (HeartbeatBatcher.take): the
    outage ends at the first heartbeat after the silence whichever transaction commits first."""
    node, _ = agent
    limit = settings.MOLT_NODE_OFFLINE_AFTER_SECONDS
    t0 = timezone.now() - timedelta(hours=2)
    for settle_first in (True, False):
        NodeOutage.objects.all().delete()
        Node.objects.filter(pk=node.pk).update(last_seen_at=t0)
        back = t0 + timedelta(seconds=limit + 60)
        batcher = HeartbeatBatcher()
        batcher.beat(node, None, at=back)
        in_flight = batcher.in_flight = batcher.pending
        batcher.pending = {}
        ack_at = back + timedelta(seconds=3)
        taken = batcher.take(node, None, at=ack_at)
        if settle_first:
            settle_pending(taken)
            record_heartbeats(in_flight)
        else:
            record_heartbeats(in_flight)
            settle_pending(taken)
        assert outages(node) == [(t0, back)], settle_first
        assert Node.objects.get(pk=node.pk).last_seen_at == ack_at
        t0 = ack_at + timedelta(hours=1)


@pytest.mark.postgres  # row locks: SQLite has one writer at a time, and the flush waits
def test_a_row_another_transaction_holds_is_left_for_the_next_flush(agent):
    node, _ = agent
    at = timezone.now()
    outcome = {}

    def flush_while_locked():
        import threading

        from django.db import connection, transaction

        def other():
            try:
                outcome.update(record_heartbeats({node.pk: Beat(node, at, at, None)}))
            finally:
                connection.close()

        with transaction.atomic():
            Node.objects.select_for_update().get(pk=node.pk)
            thread = threading.Thread(target=other)
            thread.start()
            thread.join(30)

    flush_while_locked()
    assert outcome["skipped"] == {node.pk}
    assert Node.objects.get(pk=node.pk).last_seen_at != at


async def _connect(node, identity) -> WebsocketCommunicator:
    from config.asgi import application

    socket = WebsocketCommunicator(application, "/ws/agent/")
    connected, _ = await socket.connect()
    assert connected
    challenge = await socket.receive_json_from(timeout=5)
    body = wire.AgentAuth(
        node_id=node.node_id, challenge=challenge["challenge"], timestamp=int(time.time())
    ).to_dict()
    envelope = wire.signed_envelope(wire.AGENT_AUTH, body, identity)
    await socket.send_json_to({"type": "auth", "envelope": envelope})
    assert (await socket.receive_json_from(timeout=5))["type"] == "welcome"
    assert (await socket.receive_json_from(timeout=5))["type"] == "desired_state"
    return socket


def _last_seen(node):
    def read():
        # The SQLite pass's test database is in memory with a shared cache: a read that meets
        # the flush thread's write gets "database table is locked" at once, with no busy
        # timeout (a file database, as `make run` uses, waits instead). CI's SQLite pass hit it
        # once; ask again.
        for _ in range(50):
            try:
                return Node.objects.get(pk=node.pk).last_seen_at
            except OperationalError as exc:
                if "locked" not in str(exc):
                    raise
                time.sleep(0.02)
        return Node.objects.get(pk=node.pk).last_seen_at

    return database_sync_to_async(read)()


def test_heartbeat_frames_wait_for_the_flush_and_a_clean_close_loses_none(agent, quiet):
    node, identity = agent
    before = Node.objects.get(pk=node.pk).last_seen_at

    async def scenario():
        socket = await _connect(node, identity)
        for _ in range(3):
            await socket.send_json_to({"type": "heartbeat"})
        await asyncio.sleep(0.2)
        # Nothing written on the frames' path: the connect and heartbeats wait for a flush.
        assert await _last_seen(node) == before
        pending = liveness.batcher().pending[node.pk]
        heard = pending.last
        await socket.disconnect()
        return heard

    heard = async_to_sync(scenario)()
    assert Node.objects.get(pk=node.pk).last_seen_at == heard


def test_the_periodic_flush_writes_the_heartbeats(agent, quiet):
    node, identity = agent
    quiet.MOLT_HEARTBEAT_FLUSH_SECONDS = 1

    async def scenario():
        socket = await _connect(node, identity)
        await socket.send_json_to({"type": "heartbeat"})
        for _ in range(100):
            if await _last_seen(node) != node.last_seen_at:
                break
            await asyncio.sleep(0.05)
        written = await _last_seen(node)
        await socket.disconnect()
        return written

    assert async_to_sync(scenario)() != node.last_seen_at


def test_an_ack_after_a_silence_records_the_outage_to_the_reconnect_first(agent, quiet):
    """The silence ended at the connect (a heartbeat still in the batch): the ack writes it,
    and the outage ends there, not at the ack, before the ack is processed."""
    node, identity = agent
    silent_since = timezone.now() - timedelta(minutes=10)
    Node.objects.filter(pk=node.pk).update(last_seen_at=silent_since)

    async def scenario():
        connect_from = timezone.now()
        socket = await _connect(node, identity)
        connected = liveness.batcher().pending[node.pk].first
        assert connected >= connect_from
        await asyncio.sleep(1.1)  # the ack comes later than the reconnect
        ack = wire.Ack(
            node_id=node.node_id, revision=0, results=(), timestamp=int(time.time())
        ).to_dict()
        await socket.send_json_to(
            {"type": "ack", "envelope": wire.signed_envelope(wire.ACK, ack, identity)}
        )
        for _ in range(100):
            if await database_sync_to_async(lambda: outages(node))():
                break
            await asyncio.sleep(0.05)
        await socket.disconnect()
        return connected

    connected = async_to_sync(scenario)()
    assert outages(node) == [(silent_since, connected)]
    assert Node.objects.get(pk=node.pk).last_seen_at > connected


def test_a_revocation_the_group_message_missed_is_found_by_the_next_flush(agent, quiet):
    node, identity = agent

    async def scenario():
        socket = await _connect(node, identity)
        # Revoked behind the consumer's back: no node_revoked message reaches it.
        await database_sync_to_async(
            lambda: Node.objects.filter(pk=node.pk).update(revoked_at=timezone.now())
        )()
        await socket.send_json_to({"type": "heartbeat"})
        await asyncio.sleep(0.1)
        await liveness.batcher().flush()
        error = await socket.receive_json_from(timeout=5)
        if error["type"] == "refused":
            error = await socket.receive_json_from(timeout=5)
        assert error == {"type": "error", "detail": "node revoked"}
        closed = await socket.receive_output(timeout=5)
        assert closed == {"type": "websocket.close", "code": wire.CLOSE_FORBIDDEN}
        await socket.disconnect()

    async_to_sync(scenario)()


def test_an_ack_from_a_revoked_node_is_refused(agent, quiet):
    node, identity = agent

    async def scenario():
        socket = await _connect(node, identity)
        await database_sync_to_async(
            lambda: Node.objects.filter(pk=node.pk).update(revoked_at=timezone.now())
        )()
        ack = wire.Ack(
            node_id=node.node_id, revision=0, results=(), timestamp=int(time.time())
        ).to_dict()
        await socket.send_json_to(
            {"type": "ack", "envelope": wire.signed_envelope(wire.ACK, ack, identity)}
        )
        error = await socket.receive_json_from(timeout=5)
        if error["type"] == "refused":
            error = await socket.receive_json_from(timeout=5)
        assert error["detail"] == "node revoked"
        assert (await socket.receive_output(timeout=5))["code"] == wire.CLOSE_FORBIDDEN
        await socket.disconnect()

    async_to_sync(scenario)()


def test_an_ack_writes_heartbeats_first_only_when_one_waiting_could_end_an_outage(agent, settings):
    """before_settling: with the node's last_seen_at known recent and nothing waiting that
    starts past the limit, the ack's heartbeat joins the batch (no write on its path);
    otherwise the waiting heartbeats are handed over to be written first."""
    node, _ = agent
    limit = timedelta(seconds=settings.MOLT_NODE_OFFLINE_AFTER_SECONDS)
    now = timezone.now()
    batcher = HeartbeatBatcher()
    batcher.sockets[node.pk] = {object()}
    batcher.written[node.pk] = now - limit + timedelta(seconds=1)
    assert batcher.before_settling(node, None, at=now) is None
    assert batcher.pending[node.pk].first == now  # in the batch instead

    batcher.pending.clear()
    batcher.written[node.pk] = now - limit - timedelta(seconds=1)  # a silence ends now
    taken = batcher.before_settling(node, None, at=now)
    assert taken is not None and taken.first == now and node.pk not in batcher.pending

    # A heartbeat waiting in the batch that ends a silence the database has not seen.
    batcher.written[node.pk] = now - 3 * limit
    batcher.beat(node, None, at=now - limit)
    taken = batcher.before_settling(node, None, at=now)
    assert taken is not None and taken.first == now - limit

    # A node this process knows nothing of (no auth read, no write): written first.
    assert HeartbeatBatcher().before_settling(node, None, at=now) is not None


def test_steady_acks_leave_heartbeats_to_the_batch_and_outages_stay_exact(agent, quiet):
    node, identity = agent
    recent = timezone.now() - timedelta(seconds=2)
    Node.objects.filter(pk=node.pk).update(last_seen_at=recent)

    async def scenario():
        socket = await _connect(node, identity)
        ack = wire.Ack(
            node_id=node.node_id, revision=0, results=(), timestamp=int(time.time())
        ).to_dict()
        await socket.send_json_to(
            {"type": "ack", "envelope": wire.signed_envelope(wire.ACK, ack, identity)}
        )
        await socket.send_json_to({"type": "report", "detail": "sync point"})
        for _ in range(100):
            report = await database_sync_to_async(
                lambda: Node.objects.get(pk=node.pk).last_report
            )()
            if report == "sync point":
                break
            await asyncio.sleep(0.05)
        # The ack wrote no heartbeat: the connect's and the ack's wait in the batch.
        assert await _last_seen(node) == recent
        assert len(liveness.batcher().pending) == 1
        await socket.disconnect()

    async_to_sync(scenario)()
    assert Node.objects.get(pk=node.pk).last_seen_at > recent
    assert outages(node) == []


def test_a_flush_writes_every_nodes_heartbeat_in_one_statement_without_a_branch_per_row(provider):
    """Each node its own last_seen_at and address (one it did not send keeps the one it had);
    on PostgreSQL one UPDATE from a list of values, not a CASE with a branch per row and field
    (building that was most of a batch's time in the web process)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    nodes = [
        enrol_node(provider, hostname=f"w{i}", gpus=[factories.gpu(0)], observed_ip="203.0.113.7")[
            0
        ]
        for i in range(4)
    ]
    now = timezone.now()
    beats = {
        node.pk: Beat(node, now, now + timedelta(seconds=i), f"198.51.100.{i}" if i % 2 else None)
        for i, node in enumerate(nodes)
    }
    with CaptureQueriesContext(connection) as queries:
        assert record_heartbeats(beats) == {"revoked": set(), "skipped": set()}
    assert dict(Node.objects.values_list("pk", "last_seen_at")) == {
        node.pk: now + timedelta(seconds=i) for i, node in enumerate(nodes)
    }
    assert list(Node.objects.order_by("pk").values_list("observed_ip", flat=True)) == [
        "203.0.113.7", "198.51.100.1", "203.0.113.7", "198.51.100.3",
    ]  # fmt: skip
    updates = [q["sql"] for q in queries.captured_queries if q["sql"].startswith("UPDATE")]
    assert len(updates) == 1
    if connection.vendor == "postgresql":
        assert "CASE" not in updates[0], updates
