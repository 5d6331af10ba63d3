"""A real Celery worker killed with SIGKILL in the middle of settlement or allocation: the task
runs again and its effect lands exactly once.

No test hooks: the test holds a PostgreSQL row lock that the task's transaction needs (a
buyer's wallet for settlement, the address pool for allocation), so the worker blocks inside
its transaction with part of its writes done. The test then kills it, a fresh worker gets the
message again, and the lock is released:

- settlement: the whole worker (main process and pool child) is killed. The message, never
  acknowledged (acks_late), is restored by the next worker after the broker's visibility
  timeout, shortened here to 3 s through CELERY_VISIBILITY_TIMEOUT_SECONDS;
- allocation: only the pool process running the task is killed; the worker's main process
  requeues the message at once (task_reject_on_worker_lost) and a new pool process runs it.

A backend whose client died while it waited on a lock finishes its statement when the lock is
released, finds the client gone and rolls back: nothing of the killed run commits.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from celery import Celery
from django.db import connection
from django.utils import timezone

from marketplace import ledger
from marketplace.audit import audit_ledger
from marketplace.listings import create_listing
from marketplace.models import EscrowHold, LedgerTransaction, Order, Settlement
from marketplace.orders import place_order, provision_order
from meshnet import ipplan
from meshnet.agent_channel import acknowledge_revision
from meshnet.models import IpAllocation, IpPool, JobPeer, Node
from meshnet.nodes import record_heartbeat
from tests import factories
from tests.factories import USD
from tests.integration.conftest import database_url, running_gateway, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

BIN = Path(sys.executable).parent


@pytest.fixture
def gateway(transactional_db, tmp_path, settings, monkeypatch):
    monkeypatch.setenv("CELERY_VISIBILITY_TIMEOUT_SECONDS", "3")
    with running_gateway(tmp_path, settings) as gw:
        wait_for_worker(gw, "worker")
        yield gw
        print(gw.logs())  # shown when the test failed


def wait_for_worker(gw, name: str) -> None:
    log = gw.log_dir / f"{name}.log"
    wait_until(
        lambda: log.exists() and " ready." in log.read_text(),
        timeout=60,
        message=f"celery {name} to be ready",
    )


def start_worker(gw, name: str) -> None:
    gw.start(
        name,
        [str(BIN / "celery"), "-A", "config", "worker", "-l", "info", "--concurrency", "1",
         "--without-gossip", "--without-mingle", "--hostname", f"{name}-{time.time_ns()}@%h"],
    )  # fmt: skip
    wait_for_worker(gw, name)


def received(gw, worker: str, task: str) -> list[str]:
    """Ids of `task` messages the worker's log says it received, in order."""
    pattern = re.compile(rf"Task {re.escape(task)}\[([0-9a-f-]+)\] received")
    return pattern.findall((gw.log_dir / f"{worker}.log").read_text())


def send(gw, task: str, *args) -> None:
    """Enqueue `task` on the gateway's broker, as beat or a committed transaction does."""
    app = Celery()
    # An explicit connection: this process's CELERY_BROKER_URL (memory://, tests/conftest.py)
    # would win over Celery(broker=...).
    with app.connection_for_write(gw.env["CELERY_BROKER_URL"]) as conn:
        app.send_task(task, args=list(args), connection=conn)
    app.close()


class RowLock:
    """A row lock held by a connection of its own, like another transaction would."""

    def __init__(self, table: str, pk: int) -> None:
        self.conn = psycopg.connect(database_url())
        self.conn.execute(f"SELECT id FROM {table} WHERE id = %s FOR UPDATE", [pk])  # noqa: S608

    def release(self) -> None:
        if not self.conn.closed:
            self.conn.rollback()
            self.conn.close()


def lock_waiters() -> int:
    """Backends of this test database waiting on a lock now."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return cursor.fetchone()[0]


def heartbeats(node, start, end) -> None:
    at = start
    while at <= end:
        record_heartbeat(Node.objects.get(pk=node.pk), at=at)
        at += timedelta(seconds=15)


def running_order_on_a_lost_node(buyer, provider, start) -> Order:
    """An order that ran on a node whose heartbeats stopped 40 minutes ago."""
    node = factories.enrolled_node(provider, gpus=[factories.gpu(0)])
    listing = create_listing(
        provider, node=node, gpu_count=1, price_per_gpu_hour=3_600_000, price_per_gib=0
    )
    ledger.grant_credits(buyer, 100 * USD)
    order = place_order(
        buyer,
        listing_id=listing.pk,
        gpu_count=1,
        hours=2,
        wireguard_public_key=factories.wg_public_key(),
    )
    provision_order(order.pk)
    node.refresh_from_db()
    acknowledge_revision(node, node.desired_revision, at=start)
    heartbeats(node, start, start + timedelta(minutes=20))
    order = Order.objects.get(pk=order.pk)
    assert order.state == "running"
    return order


def test_a_worker_killed_mid_settlement_settles_exactly_once(gateway, buyer, stranger, provider):
    start = timezone.now() - timedelta(hours=1)
    first = running_order_on_a_lost_node(buyer, provider, start)
    second = running_order_on_a_lost_node(stranger, provider, start)
    assert first.pk < second.pk  # the sweep ends them in id order

    # The second settlement must credit its buyer's wallet: hold that row.
    lock = RowLock("marketplace_account", ledger.wallet_account(stranger).pk)
    try:
        send(gateway, "marketplace.tasks.expire_orders")

        def first_settled_and_second_blocked():
            return Settlement.objects.filter(order=first).exists() and lock_waiters() == 1

        wait_until(
            first_settled_and_second_blocked,
            timeout=30,
            message="the worker to settle the first order and block inside the second",
        )
        gateway.stop("worker", signal.SIGKILL)

        # Killed inside the second settlement's transaction: nothing of it is visible.
        assert Order.objects.get(pk=second.pk).state == "running"
        assert not Settlement.objects.filter(order=second).exists()
        assert EscrowHold.objects.get(order=second).state == "open"

        start_worker(gateway, "worker2")
        # The unacknowledged message comes back; the new run blocks on the same lock (behind
        # the dead run's backend, which still waits for it).
        wait_until(lambda: lock_waiters() == 2, timeout=60, message="the task to run again")
    finally:
        lock.release()

    wait_until(
        lambda: Settlement.objects.filter(order=second).exists(),
        timeout=30,
        message="the second order to be settled",
    )
    for order in (first, second):
        order = Order.objects.select_related("settlement", "hold").get(pk=order.pk)
        assert order.state == "failed"
        assert Settlement.objects.filter(order=order).count() == 1
        assert LedgerTransaction.objects.filter(resolves_hold=order.hold).count() == 1
        assert order.settlement.billed_seconds == 20 * 60  # to the node's last heartbeat
    assert LedgerTransaction.objects.filter(kind="capture").count() == 2
    assert audit_ledger() == []
    # One message, delivered to the killed worker and again to the new one.
    killed = received(gateway, "worker", "marketplace.tasks.expire_orders")
    assert len(killed) == 1
    assert received(gateway, "worker2", "marketplace.tasks.expire_orders") == killed


def pool_children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (the worker's pool processes)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def test_a_pool_process_killed_mid_allocation_allocates_exactly_once(gateway, buyer, provider):
    node = factories.enrolled_node(provider, gpus=[factories.gpu(0)])
    listing = create_listing(
        provider, node=node, gpu_count=1, price_per_gpu_hour=USD, price_per_gib=0
    )
    ledger.grant_credits(buyer, 100 * USD)
    order = place_order(
        buyer,
        listing_id=listing.pk,
        gpu_count=1,
        hours=1,
        wireguard_public_key=factories.wg_public_key(),
    )
    revision = Node.objects.get(pk=node.pk).desired_revision
    leases = IpAllocation.objects.count()
    # Job addresses come from the jobs block; its pool row is made on first use, so make it here
    # to have a row to lock.
    pool, _ = IpPool.objects.get_or_create(
        name=ipplan.JOB_BLOCK, defaults={"cidr": ipplan.block(ipplan.JOB_BLOCK).cidr}
    )

    # Allocation takes the address pool's row lock after locking the order and the node.
    lock = RowLock("meshnet_ippool", pool.pk)
    try:
        send(gateway, "marketplace.tasks.provision_order", order.pk)
        wait_until(lambda: lock_waiters() == 1, timeout=30, message="allocation to block")
        (child,) = pool_children(gateway.processes["worker"].pid)
        os.kill(child, signal.SIGKILL)
        # The main process requeues the message and a new pool process runs it again.
        wait_until(lambda: lock_waiters() == 2, timeout=30, message="the task to run again")
        assert Order.objects.get(pk=order.pk).state == "pending"
        assert not JobPeer.objects.filter(ref=f"order:{order.pk}").exists()
    finally:
        lock.release()

    wait_until(
        lambda: Order.objects.get(pk=order.pk).state == "provisioning",
        timeout=30,
        message="the order to be provisioned",
    )
    assert JobPeer.objects.filter(ref=f"order:{order.pk}").count() == 1
    assert IpAllocation.objects.count() == leases + 1
    assert Node.objects.get(pk=node.pk).desired_revision == revision + 1
    ids = received(gateway, "worker", "marketplace.tasks.provision_order")
    assert len(ids) == 2 and len(set(ids)) == 1  # one message, delivered twice
    assert "WorkerLostError" in (gateway.log_dir / "worker.log").read_text()
    assert audit_ledger() == []
