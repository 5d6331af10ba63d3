"""Redis, the broker and channel layer, killed mid-order and restarted empty: every queued task
and channel group is gone. Writes during the outage still answer 2xx (they committed; the
database is the outbox), agents reconnect, and the sweeps finish what the lost messages would
have done."""

from __future__ import annotations

import pytest

from marketplace.models import Order
from tests.factories import wg_public_key
from tests.faults.conftest import (
    assert_recovered,
    fault_market,
    pause,
    run_sweeps,
)
from tests.integration.conftest import wait_until
from tests.integration.test_agent_daemon import RunningAgent

pytestmark = [pytest.mark.faults, pytest.mark.postgres]


def state_of(order_id: int) -> str:
    return Order.objects.values_list("state", flat=True).get(pk=order_id)


def test_redis_killed_and_restarted_mid_order(
    fault_gateway, redis_server, buyer, provider, tmp_path
):
    gateway = fault_gateway(MOLT_PENDING_SWEEP_AFTER_SECONDS="1")
    provider_node, listing, client = fault_market(gateway, provider, buyer, tmp_path)

    with RunningAgent(provider_node.agent):
        status, running = client.order(listing.pk, wg_public_key())
        assert status == 201, running
        wait_until(
            lambda: state_of(running["id"]) == "running", timeout=30, message="the first order"
        )
        # In flight when the broker dies: placed, its provisioning task queued in Redis.
        status, in_flight = client.order(listing.pk, wg_public_key())
        assert status == 201, in_flight
        redis_server.stop()

        # Writes while Redis is down: each commits, so each must say so with a 2xx.
        status, placed = client.order(listing.pk, wg_public_key())
        assert status == 201, placed
        keyed_key = wg_public_key()
        status, keyed = client.order(listing.pk, keyed_key, **{"Idempotency-Key": "k-1"})
        assert status == 201, keyed
        status, stopped = client.request("POST", f"/api/v1/orders/{running['id']}/stop/")
        assert status == 200 and stopped["state"] == "stopping", stopped
        # The retry of the keyed order (its client never trusts one answer) books nothing new.
        status, again = client.order(listing.pk, keyed_key, **{"Idempotency-Key": "k-1"})
        assert status in (200, 201) and again["id"] == keyed["id"], again
        assert state_of(placed["id"]) == "pending"
        pause(2)  # the outage lasts: agents' connections fail, their reconnects too

        redis_server.start()  # empty: no queued task, no channel group survived
        run_sweeps(gateway)
        for order in (in_flight, placed, keyed):
            wait_until(
                lambda order=order: state_of(order["id"]) == "running",
                timeout=30,
                message=f"order {order['id']} to run after the outage\n{gateway.logs()}",
            )
        wait_until(
            lambda: state_of(running["id"]) == "completed",
            timeout=30,
            message=f"the order stopped during the outage to complete\n{gateway.logs()}",
        )
        assert_recovered(gateway, [client], [provider_node])
    assert Order.objects.count() == 4
