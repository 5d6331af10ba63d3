"""A re-key through the real daemon and gateway bills the old key's last bytes: those the agent
reads just before it removes the old key, after the last periodic sample."""

from __future__ import annotations

import pytest
from clawnode.backends.base import PeerStatus
from clawnode.backends.memory import FakeBackend

from marketplace import ledger
from marketplace.listings import create_listing
from marketplace.models import Order, Settlement
from meshnet.models import JobPeerKey
from tests.factories import wg_public_key
from tests.integration import test_agent_daemon as daemon
from tests.integration.conftest import wait_until
from tests.integration.test_order_provisioning import call

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

provider_node = daemon.provider_node
MIB = 1 << 20


class LastBytesBackend(FakeBackend):
    """Traffic that crosses a peer's tunnel after the last periodic sample: the device shows it
    only when the agent reads the counters of the peers it is about to remove."""

    def __init__(self) -> None:
        super().__init__()
        self.late: dict[str, tuple[int, int]] = {}

    def read_peers(self, public_keys) -> dict[str, PeerStatus]:
        for key in public_keys:
            if key in self.late and key in self.peers:
                rx, tx = self.late.pop(key)
                self.add_traffic(key, rx=rx, tx=tx)
        return super().read_peers(public_keys)


def test_the_old_keys_bytes_after_its_last_sample_are_billed_after_a_rekey(
    gateway, buyer, provider, provider_node
):
    _identity, node, _state, _enrollment = provider_node
    listing = create_listing(
        provider, node=node, gpu_count=2, price_per_gpu_hour=3_600_000, price_per_gib=1_000_000
    )
    ledger.grant_credits(buyer, 500_000_000)
    backend = LastBytesBackend()
    old, new = wg_public_key(), wg_public_key()
    with daemon.RunningAgent(daemon.make_agent(provider_node, backend)):
        order_id, token = daemon.order(gateway, buyer, listing, old)
        wait_until(
            lambda: Order.objects.filter(pk=order_id, state="running").exists(),
            timeout=30,
            message=f"the order to run\n{gateway.logs()}",
        )
        backend.add_traffic(old, rx=3 * MIB, tx=5 * MIB)
        wait_until(
            lambda: Order.objects.filter(pk=order_id, bytes_out=3 * MIB).exists(),
            timeout=20,
            message="the old key's periodic bytes",
        )
        backend.late[old] = (7 * MIB, 11 * MIB)

        status, body = call(
            gateway,
            "POST",
            f"/api/v1/orders/{order_id}/rekey/",
            token,
            {"wireguard_public_key": new},
        )
        assert status == 200, body
        wait_until(
            lambda: new in backend.peers and old not in backend.peers,
            timeout=20,
            message="the agent to swap the peer",
        )
        assert not backend.late, "the agent did not read the old key's last counters"
        wait_until(
            lambda: Order.objects.filter(
                pk=order_id, bytes_out=10 * MIB, bytes_in=16 * MIB
            ).exists(),
            timeout=20,
            message=f"the old key's last bytes on the order\n{gateway.logs()}",
        )
        wait_until(
            lambda: JobPeerKey.objects.filter(public_key=old, closed_at__isnull=False).exists(),
            timeout=20,
            message="the old key closed by the ack",
        )

        backend.add_traffic(new, rx=1 * MIB, tx=2 * MIB)
        status, body = call(gateway, "POST", f"/api/v1/orders/{order_id}/stop/", token, {})
        assert status == 200, body
        done = wait_until(
            lambda: Order.objects.filter(pk=order_id, state="completed").first(),
            timeout=30,
            message="the order to complete",
        )
    assert (done.bytes_out, done.bytes_in) == (11 * MIB, 18 * MIB)
    settlement = Settlement.objects.get(order_id=order_id)
    assert settlement.bandwidth_bytes == 29 * MIB
    assert settlement.bandwidth_charge == 29 * MIB * 1_000_000 // 1024**3
