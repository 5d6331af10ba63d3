"""Gateway key rotation with the real clawnode daemon (fake WireGuard backend) against the real
gateway: the operator runs `manage.py rotate_gateway_key` while the agent is connected; the
agent follows the certificate chain, pins the new key on disk, and after a restart trusts it
directly and runs an order, without re-joining."""

from __future__ import annotations

import subprocess
import sys

import pytest
from clawnode.backends.memory import FakeBackend
from clawnode.daemon import Agent
from clawnode.firewall import FakeFirewall
from clawnode.gpu import SimulatedGpuReader
from clawnode.keys import Identity

from marketplace import ledger
from marketplace.listings import create_listing
from marketplace.models import Order
from meshnet.gateway_key import gateway_key_path
from tests.conftest import REPO
from tests.factories import wg_public_key
from tests.integration.conftest import wait_until
from tests.integration.test_agent_daemon import (  # noqa: F401 (provider_node is a fixture)
    FAST,
    RunningAgent,
    order,
    provider_node,
)

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


def agent_from_disk(provider_node, backend, said: list[str]) -> Agent:  # noqa: F811
    identity, _node, state, _enrollment = provider_node
    return Agent(
        state=state,
        enrollment=state.load_enrollment(),
        identity=identity,
        backend=backend,
        firewall=FakeFirewall(),
        gpus=SimulatedGpuReader("RTX 4090:2"),
        timing=FAST,
        say=said.append,
    )


def test_a_connected_agent_follows_a_rotation_and_keeps_the_new_key_across_a_restart(
    gateway,
    buyer,
    provider,
    provider_node,  # noqa: F811
):
    _identity, node, state, enrollment = provider_node
    old_key = enrollment.gateway_public_key
    backend = FakeBackend()
    said: list[str] = []
    agent = agent_from_disk(provider_node, backend, said)
    with RunningAgent(agent):
        wait_until(lambda: agent.applied_revision >= 0, timeout=20, message="first state")
        rotated = subprocess.run(
            [sys.executable, "manage.py", "rotate_gateway_key"],
            cwd=REPO,
            env=gateway.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert rotated.returncode == 0, rotated.stderr
        assert "pushed the state signed by the new key to 1 nodes" in rotated.stdout
        new_key = Identity.load(gateway_key_path()).public_key_b64
        assert new_key != old_key
        pinned = wait_until(
            lambda: state.load_enrollment().gateway_public_key == new_key,
            timeout=20,
            message=f"the agent to pin the new key\n{said}",
        )
        assert pinned
    assert state.load_enrollment().gateway_key_sequence == 1
    assert any("gateway key rotated" in line for line in said)

    # Restarted: trusts the new key from its enrolment file, and an order runs through it.
    said.clear()
    listing = create_listing(
        provider, node=node, gpu_count=2, price_per_gpu_hour=1_000_000, price_per_gib=0
    )
    ledger.grant_credits(buyer, 500_000_000)
    key = wg_public_key()
    restarted = agent_from_disk(provider_node, backend, said)
    assert restarted.enrollment.gateway_public_key == new_key
    with RunningAgent(restarted):
        order_id, _token = order(gateway, buyer, listing, key)
        wait_until(
            lambda: Order.objects.filter(pk=order_id, state="running").exists(),
            timeout=30,
            message=f"the order to run\n{said}\n{gateway.logs()}",
        )
    assert key in backend.peers
    assert not any("refused" in line for line in said), said
