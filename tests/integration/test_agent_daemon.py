"""The real clawnode daemon (fake WireGuard backend, the one stand-in allowed at this tier)
against the real gateway: orders run, stop, settle, and metered bytes reach the bill."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from asgiref.sync import async_to_sync
from channels_redis.core import RedisChannelLayer
from clawnode import wire
from clawnode.backends.memory import FakeBackend
from clawnode.daemon import Agent, Timing
from clawnode.firewall import FakeFirewall
from clawnode.gpu import SimulatedGpuReader
from clawnode.keys import Identity
from clawnode.state import Enrollment, StateDir
from django.db.models import F

from marketplace import ledger
from marketplace.listings import create_listing
from marketplace.models import Order, Settlement
from marketplace.tokens import issue_api_token
from meshnet import peers
from meshnet.agent_channel import node_group
from meshnet.enrolment import create_enrollment_token, enroll_node
from meshnet.gateway_key import gateway_identity
from meshnet.models import JobPeer, Node
from tests.factories import enroll_request, gpu, wg_public_key
from tests.integration.conftest import wait_until
from tests.integration.test_crash_safety import send
from tests.integration.test_order_provisioning import call

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

FAST = Timing(heartbeat=0.5, metering=0.5, inventory=5, backoff_initial=0.1, backoff_max=1)


class RunningAgent:
    """The daemon on its own event loop thread, stoppable like SIGTERM would."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.loop = asyncio.new_event_loop()
        self.stop_event: asyncio.Event | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main():
            self.stop_event = asyncio.Event()
            await self.agent.run(self.stop_event)

        try:
            self.loop.run_until_complete(main())
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> RunningAgent:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.stop_event is not None:
            self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(timeout=15)
        assert not self.thread.is_alive(), "agent did not stop"


@pytest.fixture
def provider_node(gateway, provider, tmp_path):
    identity = Identity.generate()
    issued = create_enrollment_token(provider)
    node = enroll_node(
        enroll_request(
            identity, issued.token, gpus=[gpu(0, simulated=True), gpu(1, simulated=True)]
        ),
        observed_ip="203.0.113.7",
    ).node
    state = StateDir(tmp_path / "clawnode")
    identity.save(state.identity_path)
    enrollment = Enrollment(
        gateway=gateway.base_url,
        node_id=node.node_id,
        name=node.name,
        mesh_address=node.mesh_address,
        gateway_public_key=gateway_identity().public_key_b64,
        websocket_url=gateway.base_url.replace("http://", "ws://") + "/ws/agent/",
        interface="molt0",
        backend="userspace",
    )
    state.save_enrollment(enrollment)
    return identity, node, state, enrollment


def make_agent(provider_node, backend=None):
    identity, _node, state, enrollment = provider_node
    return Agent(
        state=state,
        enrollment=enrollment,
        identity=identity,
        backend=backend or FakeBackend(),
        firewall=FakeFirewall(),
        gpus=SimulatedGpuReader("RTX 4090:2"),
        timing=FAST,
        say=lambda line: None,
    )


def order(gateway, buyer, listing, key):
    token = issue_api_token(buyer)
    status, body = call(
        gateway,
        "POST",
        "/api/v1/orders/",
        token,
        {"listing": listing.pk, "gpu_count": 1, "hours": 1, "wireguard_public_key": key},
    )
    assert status == 201, body
    import json

    return json.loads(body)["id"], token


def test_order_runs_meters_stops_and_settles_through_the_daemon(
    gateway, buyer, provider, provider_node
):
    _identity, node, _state, _enrollment = provider_node
    listing = create_listing(
        provider, node=node, gpu_count=2, price_per_gpu_hour=3_600_000, price_per_gib=1_000_000
    )
    ledger.grant_credits(buyer, 500_000_000)
    backend = FakeBackend()
    agent = make_agent(provider_node, backend)
    key = wg_public_key()
    with RunningAgent(agent):
        wait_until(
            lambda: Node.objects.get(pk=node.pk).last_seen_at, timeout=20, message="heartbeat"
        )
        order_id, token = order(gateway, buyer, listing, key)
        running = wait_until(
            lambda: Order.objects.filter(pk=order_id, state="running").first(),
            timeout=30,
            message=f"the order to run\n{gateway.logs()}",
        )
        peer = backend.peers[key]
        assert peer.allowed_ips == (f"{running.job_peer.address}/32",)

        backend.add_traffic(key, rx=3 * 1024**2, tx=5 * 1024**2)
        wait_until(
            lambda: Order.objects.filter(
                pk=order_id, bytes_in=5 * 1024**2, bytes_out=3 * 1024**2
            ).exists(),
            timeout=20,
            message="metered bytes on the order",
        )
        backend.add_traffic(key, rx=1024, tx=0)  # traffic right before the stop is billed too
        status, body = call(gateway, "POST", f"/api/v1/orders/{order_id}/stop/", token, {})
        assert status == 200, body
        done = wait_until(
            lambda: Order.objects.filter(pk=order_id, state="completed").first(),
            timeout=30,
            message="the order to complete",
        )
        assert key not in backend.peers
    assert done.bytes_out == 3 * 1024**2 + 1024
    settlement = Settlement.objects.get(order_id=order_id)
    assert settlement.bandwidth_bytes == done.bytes_in + done.bytes_out
    assert settlement.captured + settlement.released == done.hold_amount
    assert settlement.bandwidth_charge == (done.bytes_in + done.bytes_out) * 1_000_000 // 1024**3


def test_restarted_agent_resyncs_without_losing_metered_bytes(
    gateway, buyer, provider, provider_node
):
    _identity, node, _state, _enrollment = provider_node
    listing = create_listing(
        provider, node=node, gpu_count=2, price_per_gpu_hour=1_000_000, price_per_gib=0
    )
    ledger.grant_credits(buyer, 500_000_000)
    backend = FakeBackend()  # the interface outlives the agent process, as wireguard-go does
    key = wg_public_key()
    with RunningAgent(make_agent(provider_node, backend)):
        order_id, _token = order(gateway, buyer, listing, key)
        wait_until(
            lambda: Order.objects.filter(pk=order_id, state="running").exists(),
            timeout=30,
            message="the order to run",
        )
        backend.add_traffic(key, rx=1000, tx=2000)
        wait_until(
            lambda: Order.objects.filter(pk=order_id, bytes_out=1000).exists(),
            timeout=20,
            message="first bytes",
        )
    backend.add_traffic(key, rx=500, tx=500)  # traffic while the agent is down
    with RunningAgent(make_agent(provider_node, backend)):
        wait_until(
            lambda: Order.objects.filter(pk=order_id, bytes_out=1500, bytes_in=2500).exists(),
            timeout=20,
            message="bytes counted while the agent was down",
        )
        assert [c for c in backend.calls if c[0] == "set_peer"] == [
            c for c in backend.calls if c[0] == "set_peer"
        ][:1], "a restart must not re-add live peers"
    assert Order.objects.get(pk=order_id).state == "running"


def test_desired_state_with_a_bad_signature_is_refused_and_reported(
    gateway, provider, provider_node
):
    _identity, node, _state, _enrollment = provider_node
    backend = FakeBackend()
    with RunningAgent(make_agent(provider_node, backend)):
        wait_until(lambda: Node.objects.get(pk=node.pk).last_seen_at, timeout=20, message="connect")
        forged = wire.DesiredState(
            node_id=node.node_id,
            revision=99,
            peers=(
                wire.PeerSpec(
                    public_key=wg_public_key(),
                    allowed_ips=("10.100.200.1/32",),
                    kind="job",
                    ref="evil",
                ),
            ),
            issued_at=int(time.time()),
        ).to_dict()
        envelope = wire.signed_envelope(wire.DESIRED_STATE, forged, Identity.generate())
        # Straight onto the node's group, as a compromised bus could: the gateway never signed it.
        layer = RedisChannelLayer(
            hosts=[gateway.env["REDIS_URL"]], prefix=gateway.env["MOLT_CHANNEL_PREFIX"]
        )
        async_to_sync(layer.group_send)(
            node_group(node.node_id), {"type": "desired.state", "envelope": envelope}
        )
        reported = wait_until(
            lambda: Node.objects.get(pk=node.pk).last_report,
            timeout=20,
            message="the agent's report",
        )
    assert "signature" in reported
    assert backend.peers == {}


def test_a_device_lost_under_the_agent_is_rebuilt_with_its_peers(
    gateway, buyer, provider, provider_node
):
    _identity, node, _state, _enrollment = provider_node
    listing = create_listing(
        provider, node=node, gpu_count=2, price_per_gpu_hour=1_000_000, price_per_gib=0
    )
    ledger.grant_credits(buyer, 500_000_000)
    backend = FakeBackend()
    key = wg_public_key()
    with RunningAgent(make_agent(provider_node, backend)) as running:
        order_id, _token = order(gateway, buyer, listing, key)
        wait_until(
            lambda: Order.objects.filter(pk=order_id, state="running").exists(),
            timeout=30,
            message="the order to run",
        )
        backend.delete_interface()  # wireguard-go died, or someone deleted the link
        wait_until(lambda: key in backend.peers, timeout=30, message="the peer to come back")
        assert backend.exists
        assert running.error is None


def test_the_beat_task_pushes_again_a_desired_state_whose_push_was_lost(
    gateway, provider_node, settings, monkeypatch
):
    """The channel layer delivers at most once: a push that never reaches the agent leaves the
    node lagging until the beat entry repush-lagging-nodes sends the state again."""
    _identity, node, _state, _enrollment = provider_node
    backend = FakeBackend()
    with RunningAgent(make_agent(provider_node, backend)):
        wait_until(
            lambda: Node.objects.filter(
                pk=node.pk, acked_revision=F("desired_revision"), last_seen_at__isnull=False
            ).exists(),
            timeout=20,
            message="the agent to connect and acknowledge its first state",
        )
        # A peer added, its push lost (here: never sent).
        monkeypatch.setattr(peers, "_push_on_commit", lambda node_pk: None)
        key = wg_public_key()
        peers.create_job_peer(node, key, "repush:1")
        time.sleep(3)  # six heartbeats and metering samples: nothing else brings the change
        lagging = Node.objects.get(pk=node.pk)
        assert lagging.acked_revision < lagging.desired_revision
        assert key not in backend.peers

        # What beat sends, by the name its schedule gives, to the gateway's worker.
        send(gateway, settings.CELERY_BEAT_SCHEDULE["repush-lagging-nodes"]["task"])

        wait_until(
            lambda: Node.objects.filter(
                pk=node.pk, acked_revision=lagging.desired_revision
            ).exists(),
            timeout=20,
            message=f"the re-pushed state to be acknowledged\n{gateway.logs()}",
        )
        assert key in backend.peers
        assert JobPeer.objects.get(ref="repush:1").state == "active"
