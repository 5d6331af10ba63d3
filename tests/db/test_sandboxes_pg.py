"""Sandbox GPUs under real concurrency on PostgreSQL: threads, each with its own connection,
provisioning at once. Two orders racing for a node's last free GPU: one gets it, the other
waits pending; and with the free-GPU check made wrong on purpose, the constraint alone still
gives the GPU to one sandbox."""

from __future__ import annotations

import asyncio
import time

import pytest

from marketplace import ledger
from marketplace import tasks as marketplace_tasks
from marketplace.models import Order
from marketplace.orders import fail_order, place_order, provision_order
from meshnet import tasks as meshnet_tasks
from meshnet.errors import NotEnoughGpus
from meshnet.models import JobPeer, Node, Sandbox, SandboxGpu
from meshnet.peers import create_job_peer
from meshnet.sandboxes import SandboxRequest
from tests import factories
from tests.db.test_concurrency_pg import in_threads
from tests.factories import USD

pytestmark = [pytest.mark.db, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def no_tasks(monkeypatch):
    """Committed transactions here enqueue provisioning and desired-state pushes: drop them, so
    the threads below do the provisioning (run eagerly, placing would provision one order at a
    time before the race), and nothing goes to whatever broker the machine has."""
    monkeypatch.setattr(marketplace_tasks.provision_order, "delay", lambda *a, **k: None)
    monkeypatch.setattr(meshnet_tasks.push_desired_state, "delay", lambda *a, **k: None)


def test_two_orders_racing_for_the_last_free_gpu_one_gets_it(provider, buyer):
    node = factories.enrolled_node(provider, gpus=[factories.gpu(0), factories.gpu(1)])
    first = factories.sandbox_listing(provider, node, gpu_count=1)
    second = factories.sandbox_listing(provider, node, gpu_count=1)
    ledger.grant_credits(buyer, 100 * USD)
    factories.ssh_key(buyer)

    def order_on(listing) -> Order:
        return place_order(
            buyer,
            listing_id=listing.pk,
            gpu_count=1,
            hours=1,
            wireguard_public_key=factories.wg_public_key(),
        )

    # A failed job on the first listing still holds GPU 0 (its container is removed when the
    # agent acks): each listing is free to order, but the node has one free GPU.
    ended = order_on(first)
    provision_order(ended.pk)
    fail_order(ended, "test: the job failed")
    racers = [order_on(first), order_on(second)]

    in_threads(2, lambda i: provision_order(racers[i].pk))

    states = sorted(Order.objects.get(pk=order.pk).state for order in racers)
    assert states == ["pending", "provisioning"]
    winner = next(o for o in racers if Order.objects.get(pk=o.pk).state == "provisioning")
    assert list(
        SandboxGpu.objects.filter(sandbox__ref=f"order:{winner.pk}").values_list("index", flat=True)
    ) == [1]
    assert SandboxGpu.objects.filter(node=node).count() == 2  # the winner's and the leaving one
    assert Sandbox.objects.filter(node=node, removed_revision__isnull=True).count() == 1


@pytest.mark.parametrize("check", ["honest", "bypassed"])
def test_eight_threads_for_one_gpu_one_sandbox_gets_it(provider, monkeypatch, check):
    node = factories.enrolled_node(provider, gpus=[factories.gpu(0)])
    if check == "bypassed":
        # Every thread believes GPU 0 is free: only gpu_one_sandbox_at_a_time stops the rest.
        monkeypatch.setattr(
            "meshnet.sandboxes._free_gpu_indexes", lambda node, model=None: ([0], 0)
        )
    request = SandboxRequest(
        image=factories.SANDBOX_IMAGE, gpu_count=1, cpus_milli=1000, memory_mb=1024, disk_gb=1
    )

    def provision(i: int) -> str:
        try:
            create_job_peer(
                Node.objects.get(pk=node.pk),
                factories.wg_public_key(),
                ref=f"order:race-{i}",
                sandbox=request,
            )
        except NotEnoughGpus:
            return "refused"
        return "won"

    outcomes = in_threads(8, provision)
    assert sorted(outcomes) == ["refused"] * 7 + ["won"]
    assert SandboxGpu.objects.filter(node=node).count() == 1
    assert Sandbox.objects.filter(node=node).count() == 1
    # A refused sandbox took its peer with it: nothing of the losers was written.
    assert JobPeer.objects.filter(node=node).count() == 1
    assert Node.objects.get(pk=node.pk).desired_revision == 1


def test_the_agents_socket_takes_images_and_a_signed_sandbox_status(provider, buyer, settings):
    """Through the agents' websocket consumer: the inventory's images are stored, a signed
    sandbox_status frame makes the sandbox ready and (its peer acknowledged) the order running,
    and a status naming another node closes the socket with 4400."""
    from asgiref.sync import async_to_sync
    from channels.db import database_sync_to_async
    from channels.testing import WebsocketCommunicator
    from clawnode import wire

    from config.asgi import application
    from marketplace.demo_data import enrol_node
    from meshnet.agent_channel import acknowledge_revision

    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    node, identity = enrol_node(
        provider, hostname="sbx", gpus=[factories.gpu(0)], observed_ip="203.0.113.12"
    )
    listing = factories.sandbox_listing(provider, node, gpu_count=1)
    ledger.grant_credits(buyer, 100 * USD)
    factories.ssh_key(buyer)
    order = place_order(
        buyer,
        listing_id=listing.pk,
        gpu_count=1,
        hours=1,
        wireguard_public_key=factories.wg_public_key(),
    )
    provision_order(order.pk)
    acknowledge_revision(node, Node.objects.get(pk=node.pk).desired_revision)
    assert Order.objects.get(pk=order.pk).state == "provisioning"
    ref = f"order:{order.pk}"

    async def connect() -> WebsocketCommunicator:
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

    async def scenario():
        socket = await connect()
        await socket.send_json_to(
            {"type": "inventory", "gpus": [factories.gpu(0).to_dict()], "images": ["a/b:1"]}
        )
        status = factories.sandbox_status_envelope(
            identity, node.node_id, {"ref": ref, "state": "ready", "ports": [8888]}
        )
        await socket.send_json_to({"type": "sandbox_status", "envelope": status})
        # Frames of one connection are handled in turn; wait (bounded) for the last one.
        state = database_sync_to_async(lambda: Order.objects.get(pk=order.pk).state)
        for _ in range(200):
            if await state() == "running":
                break
            await asyncio.sleep(0.05)
        assert await state() == "running"
        forged = factories.sandbox_status_envelope(
            identity, "nd_" + "0" * 32, {"ref": ref, "state": "failed"}
        )
        await socket.send_json_to({"type": "sandbox_status", "envelope": forged})
        error = await socket.receive_json_from(timeout=5)
        assert "another node" in error["detail"]
        closed = await socket.receive_output(timeout=5)
        assert closed == {"type": "websocket.close", "code": wire.CLOSE_BAD_MESSAGE}
        await socket.disconnect()

    async_to_sync(scenario)()
    node.refresh_from_db()
    assert node.images == ["a/b:1"]
    sandbox = Sandbox.objects.get(ref=ref)
    assert (sandbox.state, sandbox.ports) == ("ready", [8888])
