"""An agent cut off from the gateway for longer than MOLT_NODE_FAILURE_GRACE_SECONDS (shortened
to 5 s here), silently, as a dropped link does: no FIN, no RST, the frames wait in buffers.

While it is cut: its running order fails and its stopping order completes at the next
expire-orders run, each settled once up to the node's last heartbeat; the buyers' writes (a
stop, a new order) answer as usual. When the link heals, the frames that waited arrive late
(heartbeats, and metering of traffic that crossed the tunnel during the cut), the agent gets the
desired state without the ended peers and removes them, the order placed during the cut runs,
and nothing that was settled changes."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from marketplace.models import Order, Settlement
from meshnet.models import Node
from tests.factories import USD, wg_public_key
from tests.faults.conftest import (
    Partition,
    assert_recovered,
    fault_market,
    gateway_port,
    run_sweeps,
)
from tests.integration.conftest import wait_until
from tests.integration.test_agent_daemon import RunningAgent

pytestmark = [pytest.mark.faults, pytest.mark.postgres]

GRACE = 5


def state_of(order_id: int) -> str:
    return Order.objects.values_list("state", flat=True).get(pk=order_id)


def test_agent_partitioned_longer_than_the_grace(fault_gateway, buyer, provider, tmp_path):
    gateway = fault_gateway(
        MOLT_NODE_FAILURE_GRACE_SECONDS=str(GRACE), MOLT_NODE_OFFLINE_AFTER_SECONDS=str(GRACE)
    )
    partition = Partition(gateway_port(gateway))
    # Each hold covers 50 GiB at $1: credits for several.
    provider_node, listing, client = fault_market(
        gateway, provider, buyer, tmp_path, credits=1000 * USD, price_per_gib=USD,
        websocket_base=partition.base_url,
    )  # fmt: skip
    node = provider_node.node
    try:
        with RunningAgent(provider_node.agent):
            kept_key, stopped_key = wg_public_key(), wg_public_key()
            status, kept = client.order(listing.pk, kept_key)
            assert status == 201, kept
            status, stopped = client.order(listing.pk, stopped_key)
            assert status == 201, stopped
            for order in (kept, stopped):
                wait_until(
                    lambda order=order: state_of(order["id"]) == "running",
                    timeout=30,
                    message=f"order {order['id']} to run",
                )

            partition.cut()
            # Traffic during the cut: its metering reaches the gateway only after the heal,
            # when the order has been settled without it.
            provider_node.backend.add_traffic(kept_key, rx=300 * 1024**2, tx=700 * 1024**2)
            status, body = client.request("POST", f"/api/v1/orders/{stopped['id']}/stop/")
            assert status == 200 and body["state"] == "stopping", body
            status, during = client.order(listing.pk, wg_public_key())
            assert status == 201, during
            wait_until(
                lambda: (
                    Node.objects.get(pk=node.pk).last_seen_at
                    < timezone.now() - timedelta(seconds=GRACE + 1)
                ),
                timeout=30,
                message="the node's silence to pass the grace",
            )
            run_sweeps(gateway)
            assert state_of(kept["id"]) == "failed"
            assert state_of(stopped["id"]) == "completed"
            settled = {
                s.order_id: (s.captured, s.released, s.bandwidth_bytes, s.billed_seconds)
                for s in Settlement.objects.all()
            }
            assert set(settled) == {kept["id"], stopped["id"]}

            partition.heal()
            wait_until(
                lambda: set(provider_node.backend.peers) <= {during_key(during)},
                timeout=30,
                message=f"the agent to remove the ended orders' peers\n{gateway.logs()}",
            )
            wait_until(
                lambda: state_of(during["id"]) == "running",
                timeout=30,
                message=f"the order placed during the cut to run\n{gateway.logs()}",
            )
            status, after = client.order(listing.pk, wg_public_key())
            assert status == 201, after
            wait_until(
                lambda: state_of(after["id"]) == "running",
                timeout=30,
                message="an order placed after the heal to run",
            )
            run_sweeps(gateway)
            assert_recovered(gateway, [client], [provider_node])
    finally:
        partition.close()
    # What was settled during the cut stands: the late traffic changes no bill.
    assert {
        s.order_id: (s.captured, s.released, s.bandwidth_bytes, s.billed_seconds)
        for s in Settlement.objects.filter(order_id__in=settled)
    } == settled


def during_key(order: dict) -> str:
    return Order.objects.values_list("wireguard_public_key", flat=True).get(pk=order["id"])
