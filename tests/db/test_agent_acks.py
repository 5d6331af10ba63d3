"""What an agent's ack and inventory do to the gateway's records."""

from __future__ import annotations

import pytest
from clawnode import wire
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from marketplace import ledger
from marketplace.listings import create_listing
from marketplace.models import Order
from marketplace.orders import place_order, provision_order, stop_order
from meshnet.agent_channel import AgentRefused, acknowledge_revision
from meshnet.models import JobPeer, Node
from meshnet.nodes import update_inventory
from tests.factories import enrolled_node, gpu, wg_public_key

pytestmark = [pytest.mark.db, pytest.mark.django_db]


@pytest.fixture
def running(buyer, provider):
    node = enrolled_node(provider, gpus=[gpu(0)])
    listing = create_listing(provider, node=node, gpu_count=1, price_per_gpu_hour=1_000_000,
                             price_per_gib=0)  # fmt: skip
    ledger.grant_credits(buyer, 100_000_000)
    key = wg_public_key()
    order = place_order(
        buyer, listing_id=listing.pk, gpu_count=1, hours=1, wireguard_public_key=key
    )
    provision_order(order.pk)
    acknowledge_revision(node, Node.objects.get(pk=node.pk).desired_revision)
    return node, Order.objects.get(pk=order.pk), key


def test_a_failed_removal_keeps_the_peer_and_the_revision_unacknowledged(running):
    node, order, key = running
    stop_order(order)
    revision = Node.objects.get(pk=node.pk).desired_revision
    acknowledge_revision(node, revision, failed_keys=frozenset({key}))
    peer = JobPeer.objects.get(ref=f"order:{order.pk}")
    assert peer.state == "removing"  # still on the interface: not settled, address not freed
    assert Order.objects.get(pk=order.pk).state == "stopping"
    assert Node.objects.get(pk=node.pk).acked_revision < revision  # the reconciler re-pushes
    acknowledge_revision(node, revision)
    assert JobPeer.objects.get(pk=peer.pk).state == "removed"
    assert Order.objects.get(pk=order.pk).state == "completed"


def test_inventory_keeps_known_gpus_when_the_driver_hiccups(running):
    node, _order, _key = running
    update_inventory(node, [], [], reason="NVML: driver not loaded")
    node.refresh_from_db()
    assert node.gpus.count() == 1
    assert "driver not loaded" in node.last_report


def test_inventory_health_readings_are_stored(running):
    node, _order, _key = running
    update_inventory(
        node,
        [gpu(0).to_dict()],
        [{"index": 0, "temperature_c": 61, "utilization_pct": 87}],
    )
    reading = node.gpus.get(index=0)
    assert (reading.temperature_c, reading.utilization_pct) == (61, 87)


def test_an_unchanged_inventory_writes_nothing(provider):
    """The agent resends the same inventory on every connect and every minute: read and
    compared, in one query (the node's row with its GPUs), no transaction, no lock, no write
    (a gateway restart's connect wave, and the largest share of idle agents' cost)."""
    node = enrolled_node(provider, gpus=[gpu(0), gpu(1)])
    inventory = [gpu(0).to_dict(), gpu(1).to_dict()]
    health = [{"index": 0, "temperature_c": 61, "utilization_pct": 87}, {"index": 1}]
    update_inventory(node, inventory, health, images=["docker.io/library/python:3.12"])
    with CaptureQueriesContext(connection) as queries:
        update_inventory(node, inventory, health, images=["docker.io/library/python:3.12"])
        update_inventory(node, inventory, health)  # an agent that does not name its images
    statements = [q["sql"].split()[0].upper() for q in queries.captured_queries]
    assert statements == ["SELECT"] * 2, [q["sql"] for q in queries.captured_queries]
    assert not [q for q in queries.captured_queries if "FOR UPDATE" in q["sql"]]
    # New readings alone are written without the node's row lock (which batches of acks and
    # heartbeats take on every node).
    with CaptureQueriesContext(connection) as queries:
        update_inventory(node, inventory, [{"index": 1, "temperature_c": 50}])
    assert not [q for q in queries.captured_queries if "FOR UPDATE" in q["sql"]]
    assert len(queries.captured_queries) == 2  # the read, one GPU's UPDATE
    assert node.gpus.get(index=1).temperature_c == 50
    # A reading the GPU no longer gives is stored as unknown (the UPDATE compares NULL too).
    update_inventory(node, inventory, [{"index": 1, "utilization_pct": 3}])
    second = node.gpus.get(index=1)
    assert (second.temperature_c, second.utilization_pct) == (None, 3)
    # Anything else that differs is written as before.
    update_inventory(node, inventory[:1], health, images=[])
    node.refresh_from_db()
    assert node.images == []
    assert list(node.gpus.values_list("index", "temperature_c", "utilization_pct")) == [(0, 61, 87)]


@pytest.mark.parametrize(
    "report",
    [
        {"health": [{"index": 0, "temperature_c": 70}]},  # readings alone: the unlocked path
        {"images": ["docker.io/library/python:3.12"]},  # more: the locked path
        {"reason": "NVML: driver not loaded"},
    ],
)
def test_an_inventory_of_a_node_revoked_meanwhile_is_refused_for_good(provider, report):
    """The inventory's own read of the node checks it is not revoked (the agent connection no
    longer reads the node once more for it): refused 4403, nothing written."""
    node = enrolled_node(provider, gpus=[gpu(0)])
    Node.objects.filter(pk=node.pk).update(revoked_at=timezone.now())
    gpus = [] if "reason" in report else [gpu(0).to_dict()]
    with pytest.raises(AgentRefused) as refused:
        update_inventory(node, gpus, **report)
    assert refused.value.close_code == wire.CLOSE_FORBIDDEN
    fresh = Node.objects.get(pk=node.pk)
    assert (fresh.images, fresh.last_report) == ([], "")
    assert list(fresh.gpus.values_list("temperature_c", flat=True)) == [None]
