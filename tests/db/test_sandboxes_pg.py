"""Sandbox GPUs under real concurrency on PostgreSQL: threads, each with its own connection,
provisioning at once. Two orders racing for a node's last free GPU: one gets it, the other
waits pending; and with the free-GPU check made wrong on purpose, the constraint alone still
gives the GPU to one sandbox."""

from __future__ import annotations

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
        monkeypatch.setattr("meshnet.sandboxes._free_gpu_indexes", lambda node: ([0], 0))
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
