"""The Celery worker SIGKILLed (main process and pool together) in the middle of a settlement,
while buyers go on ordering: the writes answer 201 with no worker at all, the unacknowledged
settlement message comes back to the next worker, and each order settles exactly once.

As in tests/integration/test_crash_safety.py, no test hook: a row lock that the second
settlement's transaction needs (its buyer's wallet) holds the worker inside that transaction,
with part of its writes done, when it is killed."""

from __future__ import annotations

import signal
from datetime import timedelta

import pytest
from django.utils import timezone

from marketplace import ledger
from marketplace.models import Order, Settlement
from tests.factories import wg_public_key
from tests.faults.conftest import assert_recovered, fault_market, run_sweeps
from tests.integration.conftest import wait_until
from tests.integration.test_agent_daemon import RunningAgent
from tests.integration.test_crash_safety import (
    RowLock,
    lock_waiters,
    running_order_on_a_lost_node,
    send,
    start_worker,
)

pytestmark = [pytest.mark.faults, pytest.mark.postgres]


def test_worker_killed_mid_settlement_while_buyers_order(
    fault_gateway, buyer, stranger, provider, tmp_path
):
    gateway = fault_gateway(MOLT_PENDING_SWEEP_AFTER_SECONDS="1")
    provider_node, listing, client = fault_market(gateway, provider, buyer, tmp_path)
    # Two orders on nodes silent for 40 minutes: the next expire-orders run fails and settles
    # them, billed to their last heartbeat.
    start = timezone.now() - timedelta(hours=1)
    first = running_order_on_a_lost_node(buyer, provider, start)
    second = running_order_on_a_lost_node(stranger, provider, start)

    with RunningAgent(provider_node.agent):
        lock = RowLock("marketplace_account", ledger.wallet_account(stranger).pk)
        try:
            send(gateway, "marketplace.tasks.expire_orders")
            wait_until(
                lambda: Settlement.objects.filter(order=first).exists() and lock_waiters() == 1,
                timeout=30,
                message="the worker to settle the first order and block inside the second",
            )
            gateway.stop("worker", signal.SIGKILL)
            assert Order.objects.get(pk=second.pk).state == "running"  # rolled back

            # No worker at all: orders still answer 201 (pending) and a stop answers 200.
            status, placed = client.order(listing.pk, wg_public_key())
            assert status == 201 and placed["state"] == "pending", placed
            status, cancelled = client.order(listing.pk, wg_public_key())
            assert status == 201, cancelled
            status, body = client.request("POST", f"/api/v1/orders/{cancelled['id']}/stop/")
            assert status == 200 and body["state"] == "cancelled", body

            start_worker(gateway, "worker2")
            # The killed run's message comes back and blocks on the same lock.
            wait_until(lambda: lock_waiters() == 2, timeout=60, message="the task to run again")
        finally:
            lock.release()

        run_sweeps(gateway, worker="worker2")
        wait_until(
            lambda: Order.objects.filter(pk=placed["id"], state="running").exists(),
            timeout=30,
            message=f"the order placed without a worker to run\n{gateway.logs()}",
        )
        assert_recovered(gateway, [client], [provider_node])
    for order in (first, second):
        assert Order.objects.get(pk=order.pk).state == "failed"
        assert Settlement.objects.get(order=order).billed_seconds == 20 * 60
