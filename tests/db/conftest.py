"""What the db tier's modules share beyond the personas of tests/conftest.py: the provider's
node and its listing, a buyer with credits, a provider with earnings, the provider's API
client, and the integration tier's live gateway (uvicorn and a Celery worker on the test
database).

A module whose tests need other terms (fewer GPUs, another price, the node's identity) defines
its own fixture of the same name, with a comment saying why; pytest takes the module's."""

from __future__ import annotations

import pytest

from marketplace import ledger
from marketplace.listings import create_listing
from tests import factories
from tests.factories import USD
from tests.integration.conftest import gateway  # noqa: F401  (a fixture)


@pytest.fixture
def nodes_online():
    """Every node enrolled during the test has just sent a heartbeat (the market hides offline
    nodes' listings: marketplace.market.offers). For modules about what the market shows, not
    about liveness: `pytest.mark.usefixtures("nodes_online")`."""
    from django.db.models.signals import post_save
    from django.utils import timezone

    from meshnet.models import Node

    def seen(sender, instance, created, **kwargs):  # type: ignore[no-untyped-def]
        if created:
            Node.objects.filter(pk=instance.pk).update(last_seen_at=timezone.now())
            instance.last_seen_at = timezone.now()

    post_save.connect(seen, sender=Node, dispatch_uid="tests.nodes_online")
    yield
    post_save.disconnect(sender=Node, dispatch_uid="tests.nodes_online")


@pytest.fixture
def node(provider):
    """The provider's node with four RTX 4090s, enrolled through the signed enrolment path."""
    return factories.enrolled_node(provider, gpus=[factories.gpu(i) for i in range(4)])


@pytest.fixture
def listing(provider, node):
    """All four of the node's GPUs at 2 USD per GPU-hour and 0.01 USD per GiB."""
    return create_listing(
        provider, node=node, gpu_count=4, price_per_gpu_hour=2 * USD, price_per_gib=10_000
    )


@pytest.fixture
def carol(make_user):
    """A second provider (the multi-node orders' tests give her a node in another region)."""
    return make_user("carol")


@pytest.fixture
def node_a(provider):
    """Bob's node with 2 GPUs (a multi-node order's first part)."""
    return factories.enrolled_node(provider, gpus=[factories.gpu(i) for i in range(2)])


@pytest.fixture
def node_b(carol):
    """Carol's node with 4 GPUs in another region (the second part)."""
    return factories.enrolled_node(
        carol, gpus=[factories.gpu(i) for i in range(4)], region="us-east"
    )


@pytest.fixture
def funded_buyer(buyer):
    """The buyer with 1000 USD of credits."""
    ledger.grant_credits(buyer, 1000 * USD)
    return buyer


@pytest.fixture
def earning_provider(funded_buyer, provider, listing, node):
    """The provider with one order's share released to earnings (tests/db/test_payments*.py)."""
    from marketplace import payments
    from tests.db.settled_orders import settled_order

    order = settled_order(funded_buyer, listing, node)
    payments.release_due_earnings(now=order.earnings_hold.release_after)
    assert ledger.earnings_for(provider) == order.settlement.provider_amount
    return provider


@pytest.fixture
def provider_api(api_client_for, provider):
    return api_client_for(provider)


@pytest.fixture(autouse=True)
def _close_heartbeat_flush_connection():
    """The agents' heartbeat flushes and frames run on threads of their own whose persistent
    connections would outlive the test database (meshnet.liveness, meshnet.consumers,
    meshnet.acks)."""
    yield
    from meshnet import consumers
    from meshnet.acks import close_ack_connection
    from meshnet.liveness import close_flush_connection, close_thread_connections

    close_flush_connection()
    close_ack_connection()
    close_thread_connections(consumers._agent_db_executor, consumers.AGENT_DB_THREADS)
