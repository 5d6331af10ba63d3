"""Acks recorded in batches (meshnet.acks, issue 14): a batch records what one ack at a time
recorded (revisions, peers activated and removed, refusals), in a number of statements that
does not grow with the acks of nodes with nothing to settle; acks arriving together go in one
batch, on a thread of their own, and never wait behind other agents' frames."""

from __future__ import annotations

import asyncio
import threading

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from clawnode import frames, wire
from django.db import connection
from django.test.utils import CaptureQueriesContext

from marketplace import ledger
from marketplace.demo_data import enrol_node
from marketplace.listings import create_listing
from marketplace.models import Order
from marketplace.orders import place_order, provision_order, stop_order
from meshnet import acks, consumers
from meshnet.acks import AckBatcher, PendingAck, record_acks
from meshnet.agent_channel import AgentRefused
from meshnet.models import JobPeer, Node
from tests import factories

# PostgreSQL: the ack thread has its own connection, so the rows must be committed
# (transaction=True), and on SQLite the ledger's append-only triggers refuse the flush after.
pytestmark = [pytest.mark.db, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def _agents(provider, count):
    return [
        enrol_node(
            provider, hostname=f"ack{i}", gpus=[factories.gpu(0)], observed_ip="203.0.113.30"
        )
        for i in range(count)
    ]


def _bump(nodes, to=1):
    Node.objects.filter(pk__in=[n.pk for n, _ in nodes]).update(desired_revision=to)


def _ack(identity, revision, results=None, removing=()):
    return frames.ack(identity, revision, results or {}, removing)["envelope"]


def test_a_batch_moves_every_nodes_revision_in_statements_that_do_not_grow(provider):
    few, many = _agents(provider, 2), _agents(provider, 12)
    _bump(few + many)

    def statements(agents):
        batch = [PendingAck(node, _ack(identity, 1)) for node, identity in agents]
        with CaptureQueriesContext(connection) as queries:
            assert record_acks(batch) == [None] * len(batch)
        return len(queries)

    assert statements(many) == statements(few)
    assert set(Node.objects.values_list("acked_revision", flat=True)) == {1}


def test_a_batch_moves_the_revisions_in_one_update_per_revision_acked(provider):
    """Not a CASE with a branch per row (bulk_update): building that was most of the web
    process's time recording a batch of a change to every node."""
    same, other = _agents(provider, 6), _agents(provider, 2)
    _bump(same, to=3)
    _bump(other, to=5)
    batch = [PendingAck(node, _ack(identity, 3)) for node, identity in same]
    batch += [PendingAck(node, _ack(identity, 5)) for node, identity in other]
    with CaptureQueriesContext(connection) as queries:
        assert record_acks(batch) == [None] * len(batch)
    updates = [q["sql"] for q in queries.captured_queries if q["sql"].startswith("UPDATE")]
    moved = [sql for sql in updates if '"acked_revision"' in sql.split("WHERE")[0]]
    assert len(moved) == 2 and not [sql for sql in moved if "CASE" in sql], moved
    assert dict(Node.objects.values_list("pk", "acked_revision")) == {
        **{node.pk: 3 for node, _ in same},
        **{node.pk: 5 for node, _ in other},
    }


def test_refusals_are_each_acks_own_and_the_others_are_recorded(provider):
    (ok, ok_id), (revoked, revoked_id), (ahead, ahead_id), (forged, _) = _agents(provider, 4)
    _bump([(ok, None), (revoked, None), (ahead, None), (forged, None)])
    Node.objects.filter(pk=revoked.pk).update(revoked_at=revoked.enrolled_at)
    stranger = _agents(provider, 1)[0][1]

    outcome = record_acks(
        [
            PendingAck(ok, _ack(ok_id, 1)),
            PendingAck(revoked, _ack(revoked_id, 1)),
            PendingAck(ahead, _ack(ahead_id, 2)),
            PendingAck(forged, _ack(stranger, 1)),  # signed by another node's key
        ]
    )

    assert outcome[0] is None
    codes = [exc.close_code if isinstance(exc, AgentRefused) else exc for exc in outcome[1:]]
    assert codes == [wire.CLOSE_FORBIDDEN, wire.CLOSE_BAD_MESSAGE, wire.CLOSE_BAD_MESSAGE]
    revisions = dict(Node.objects.values_list("pk", "acked_revision"))
    assert [revisions[n.pk] for n in (ok, revoked, ahead, forged)] == [1, 0, 0, 0]


def test_a_batch_settles_peers_as_one_ack_at_a_time_does(provider, buyer):
    """Beside a plain ack in the same batch: one node's new peer becomes active (its order
    running), another's removed peer is gone (its order completed), a failed key holds its
    node's revision back."""
    agents = _agents(provider, 4)
    ledger.grant_credits(buyer, 100_000_000)
    orders = []
    for node, _ in agents[:3]:
        listing = create_listing(provider, node=node, gpu_count=1, price_per_gpu_hour=1_000_000,
                                 price_per_gib=0)  # fmt: skip
        order = place_order(buyer, listing_id=listing.pk, gpu_count=1, hours=1,
                            wireguard_public_key=factories.wg_public_key())  # fmt: skip
        provision_order(order.pk)
        orders.append(Order.objects.get(pk=order.pk))
    (adding, adding_id), (leaving, leaving_id), (failing, failing_id), (plain, plain_id) = agents
    record_acks([PendingAck(leaving, _ack(leaving_id, 1))])  # its peer is up
    stop_order(Order.objects.get(pk=orders[1].pk))
    failed_key = JobPeer.objects.get(node=failing).public_key
    Node.objects.filter(pk=plain.pk).update(desired_revision=1)
    rev = dict(Node.objects.values_list("pk", "desired_revision"))

    outcome = record_acks(
        [
            PendingAck(adding, _ack(adding_id, rev[adding.pk])),
            PendingAck(leaving, _ack(leaving_id, rev[leaving.pk])),
            PendingAck(failing, _ack(failing_id, rev[failing.pk], {failed_key: "no such dev"})),
            PendingAck(plain, _ack(plain_id, 1)),
        ]
    )

    assert outcome == [None] * 4
    assert JobPeer.objects.get(node=adding).state == "active"
    assert Order.objects.get(pk=orders[0].pk).state == "running"
    assert JobPeer.objects.get(node=leaving).state == "removed"
    assert Order.objects.get(pk=orders[1].pk).state == "completed"
    assert JobPeer.objects.get(node=failing).state == "desired"
    acked = dict(Node.objects.values_list("pk", "acked_revision"))
    assert acked[adding.pk] == rev[adding.pk] and acked[leaving.pk] == rev[leaving.pk]
    assert acked[failing.pk] == 0 and acked[plain.pk] == 1


def test_acks_arriving_together_are_recorded_in_one_batch_with_each_outcome(provider, monkeypatch):
    agents = _agents(provider, 6)
    _bump(agents)
    batches = []
    real = acks.record_acks

    def recording(batch):
        batches.append(len(batch))
        return real(batch)

    monkeypatch.setattr(acks, "record_acks", recording)
    forged = _agents(provider, 1)[0][1]

    async def scenario():
        batcher = AckBatcher()
        results = await asyncio.gather(
            *(batcher.record(PendingAck(n, _ack(i, 1))) for n, i in agents[:5]),
            batcher.record(PendingAck(agents[5][0], _ack(forged, 1))),
            return_exceptions=True,
        )
        return results

    results = async_to_sync(scenario)()
    assert results[:5] == [None] * 5
    assert isinstance(results[5], AgentRefused)
    assert sum(batches) == 6 and len(batches) < 6  # the first alone at most, the rest together
    assert sorted(Node.objects.values_list("acked_revision", flat=True)) == [0, 0, 1, 1, 1, 1, 1]


def test_an_ack_is_recorded_while_every_agent_database_thread_is_busy(provider):
    """Other agents' metering and inventory hold all of the agent database threads (a slow
    database, a burst): an ack does not wait for them."""
    ((node, identity),) = _agents(provider, 1)
    _bump([(node, identity)])
    release = threading.Event()
    busy = [consumers._agent_db_executor.submit(release.wait, 30)
            for _ in range(consumers.AGENT_DB_THREADS)]  # fmt: skip

    async def scenario():
        await acks.batcher().record(PendingAck(node, _ack(identity, 1)))
        acked = await database_sync_to_async(lambda: Node.objects.get(pk=node.pk).acked_revision)()
        return acked, release.is_set()

    try:
        acked, released = async_to_sync(scenario)()
    finally:
        release.set()
        for future in busy:
            future.result()
    assert (acked, released) == (1, False)


def test_the_heartbeats_acks_carry_are_written_first_for_the_whole_batch(provider, settings):
    """Two nodes back from a silence: each outage ends at its reconnect, recorded with the
    batch, and both acks are recorded."""
    from datetime import timedelta

    from django.utils import timezone

    from meshnet.liveness import Beat
    from meshnet.models import NodeOutage

    agents = _agents(provider, 2)
    _bump(agents)
    silent_since = timezone.now() - timedelta(minutes=10)
    Node.objects.update(last_seen_at=silent_since)
    back = timezone.now() - timedelta(seconds=2)

    outcome = record_acks(
        [PendingAck(n, _ack(i, 1), Beat(n, back, back, "198.51.100.4")) for n, i in agents]
    )

    assert outcome == [None, None]
    assert sorted(NodeOutage.objects.values_list("node_id", "started_at", "ended_at")) == sorted(
        (n.pk, silent_since, back) for n, _ in agents
    )
    assert set(Node.objects.values_list("acked_revision", "last_seen_at")) == {(1, back)}
