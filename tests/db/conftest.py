"""What the db tier's modules share beyond the personas of tests/conftest.py: the provider's
node and its listing, a buyer with credits, the provider's API client, and the integration
tier's live gateway (uvicorn and a Celery worker on the test database).

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
def funded_buyer(buyer):
    """The buyer with 1000 USD of credits."""
    ledger.grant_credits(buyer, 1000 * USD)
    return buyer


@pytest.fixture
def provider_api(api_client_for, provider):
    return api_client_for(provider)
