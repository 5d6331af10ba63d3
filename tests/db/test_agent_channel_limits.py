"""The agents' websocket under hostile input, through the real consumer and ASGI routing
(Channels' WebsocketCommunicator): every limit of meshnet.agent_guard closes with its code and
an error frame, never a traceback; a real agent's frames (clawnode.frames, clawnode.metering)
pass untouched, reconnects included."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from clawnode import frames, wire
from clawnode.gpu import GpuReport
from clawnode.journal import EpochJournal
from clawnode.keys import Identity
from clawnode.metering import Meter

from meshnet import agent_channel, agent_guard, consumers, liveness
from meshnet.models import Node
from tests import factories

pytestmark = [pytest.mark.db, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def in_memory_layer(settings):
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    agent_guard.reset()
    yield
    agent_guard.reset()


@pytest.fixture
def enrolled(provider):
    from marketplace.demo_data import enrol_node

    return enrol_node(
        provider, hostname="guarded", gpus=[factories.gpu(0)], observed_ip="203.0.113.40"
    )


def communicator(address: str = "198.51.100.20") -> WebsocketCommunicator:
    from config.asgi import application

    socket = WebsocketCommunicator(application, "/ws/agent/")
    socket.scope["client"] = (address, 40000)  # the scope the application instance reads
    return socket


async def open_socket(address: str = "198.51.100.20") -> tuple[WebsocketCommunicator, dict]:
    socket = communicator(address)
    connected, _ = await socket.connect()
    assert connected
    return socket, await socket.receive_json_from(timeout=5)


async def authenticated(node, identity, address: str = "198.51.100.20") -> WebsocketCommunicator:
    socket, challenge = await open_socket(address)
    assert challenge["type"] == "challenge"
    await socket.send_json_to(frames.auth(identity, challenge["challenge"]))
    assert (await socket.receive_json_from(timeout=5))["type"] == "welcome"
    assert (await socket.receive_json_from(timeout=5))["type"] == "desired_state"
    return socket


async def closed_with(socket: WebsocketCommunicator, code: int) -> str:
    """The error frame's detail, then the close with `code`."""
    error = await socket.receive_json_from(timeout=5)
    assert error["type"] == "error"
    assert await socket.receive_output(timeout=5) == {"type": "websocket.close", "code": code}
    await socket.disconnect()
    return error["detail"]


@pytest.fixture
def frozen_buckets(monkeypatch):
    """The buckets' clock stands still: nothing refills while a slow machine works through a
    flood, so what passes is exactly the burst."""
    monkeypatch.setattr(agent_guard.time, "monotonic", lambda: 1000.0)


@pytest.fixture
def no_errors(caplog):
    caplog.set_level(logging.INFO)
    yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


def test_a_big_frame_before_auth_closes_1009(no_errors):
    async def scenario():
        socket, _ = await open_socket()
        await socket.send_to(text_data="x" * 5000)  # not even JSON: refused for its size first
        detail = await closed_with(socket, wire.CLOSE_TOO_BIG)
        assert "before auth" in detail and "4096" in detail

    async_to_sync(scenario)()


def test_a_frame_over_a_mebibyte_after_auth_closes_1009_and_one_under_passes(enrolled, no_errors):
    node, identity = enrolled

    async def scenario():
        socket = await authenticated(node, identity)
        # Big but within the limit: handled (an unknown field is ignored).
        await socket.send_json_to({"type": "heartbeat", "pad": "x" * 500_000})
        assert await socket.receive_nothing(timeout=0.5)
        await socket.send_to(text_data=json.dumps({"type": "heartbeat", "pad": "x" * (1 << 20)}))
        detail = await closed_with(socket, wire.CLOSE_TOO_BIG)
        assert "1048576" in detail

    async_to_sync(scenario)()


def test_a_binary_frame_closes_4400_without_a_traceback(enrolled, no_errors):
    node, identity = enrolled

    async def scenario():
        socket, _ = await open_socket()
        await socket.send_to(bytes_data=b"\x00\x01" * 10)
        assert "binary" in await closed_with(socket, wire.CLOSE_BAD_MESSAGE)
        socket = await authenticated(node, identity)
        await socket.send_to(bytes_data=b"{}")
        assert "binary" in await closed_with(socket, wire.CLOSE_BAD_MESSAGE)

    async_to_sync(scenario)()


def test_deep_json_closes_4400_before_and_after_auth(enrolled, no_errors):
    node, identity = enrolled

    async def scenario():
        socket, _ = await open_socket()
        await socket.send_to(text_data="[" * 1500 + "]" * 1500)
        assert "nested deeper" in await closed_with(socket, wire.CLOSE_BAD_MESSAGE)
        socket = await authenticated(node, identity)
        # Deep enough to break code that recurses over it, small enough to parse.
        deep = '{"type": "metering", "envelope": ' + "[" * 900 + "]" * 900 + "}"
        await socket.send_to(text_data=deep)
        assert "nested deeper" in await closed_with(socket, wire.CLOSE_BAD_MESSAGE)

    async_to_sync(scenario)()


def test_unauthenticated_sockets_per_address_are_capped_1013(settings, enrolled, no_errors):
    settings.MOLT_AGENT_UNAUTHENTICATED_PER_ADDRESS = 3
    settings.MOLT_AGENT_CONNECTIONS_PER_ADDRESS = 4
    node, identity = enrolled

    async def scenario():
        waiting = [(await open_socket("192.0.2.1"))[0] for _ in range(3)]
        socket = communicator("192.0.2.1")
        assert (await socket.connect())[0]
        assert "too many" in await closed_with(socket, wire.CLOSE_TRY_LATER)
        # Another address is not held up; one that authenticates frees its place.
        other, _ = await open_socket("192.0.2.2")
        await other.disconnect()
        await waiting.pop().disconnect()
        agent = await authenticated(node, identity, "192.0.2.1")
        waiting.append((await open_socket("192.0.2.1"))[0])  # 3 waiting + 1 agent = 4 in all
        fifth = communicator("192.0.2.1")
        assert (await fifth.connect())[0]
        await closed_with(fifth, wire.CLOSE_TRY_LATER)
        for socket in [*waiting, agent]:
            await socket.disconnect()
        await asyncio.sleep(0.1)
        assert not agent_guard._total, agent_guard._total  # every socket counted down

    async_to_sync(scenario)()


def test_a_heartbeat_flood_is_dropped_then_closed_4429(
    enrolled, monkeypatch, no_errors, frozen_buckets
):
    node, identity = enrolled
    handled = []
    # Heartbeats are gathered by the process's batcher (meshnet.liveness) and written in
    # batches: what the guard let through is what reached the batcher.
    real = liveness.HeartbeatBatcher.beat

    def counting(self, *args, **kwargs):
        handled.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(liveness.HeartbeatBatcher, "beat", counting)

    async def scenario():
        socket = await authenticated(node, identity)
        for _ in range(2000):
            await socket.send_json_to({"type": "heartbeat"})
        assert "dropped" in await closed_with(socket, wire.CLOSE_RATE_LIMITED)

    async_to_sync(scenario)()
    # The auth's heartbeat and the burst, not 2,000 handled.
    assert len(handled) == 1 + agent_guard.RATES["heartbeat"].burst


def test_a_metering_flood_closes_4429_at_its_burst(
    enrolled, monkeypatch, no_errors, tmp_path, frozen_buckets
):
    node, identity = enrolled
    meter = Meter(identity, EpochJournal(tmp_path))
    # Counted where the consumer checks a sample: samples naming no open peer are not
    # stored (agent_channel.record_metering), so the table would not show what got through.
    ingested = []
    real = agent_channel.check_metering

    def counting(*args, **kwargs):
        ingested.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(agent_channel, "check_metering", counting)

    async def scenario():
        socket = await authenticated(node, identity)
        burst = int(agent_guard.RATES["metering"].burst)
        for _ in range(burst * 2):
            await socket.send_json_to(frames.metering(meter.sample({})))
        assert "metering" in await closed_with(socket, wire.CLOSE_RATE_LIMITED)

    async_to_sync(scenario)()
    assert len(ingested) == agent_guard.RATES["metering"].burst


def test_a_real_agents_traffic_and_reconnects_pass(enrolled, no_errors, tmp_path):
    """What clawnode sends on each session (auth, then on welcome the final counters, its
    inventory and sandbox report, its first heartbeat and sample, an ack of the state it got),
    five sessions in a row, as a restart loop would; then a minute's worth of its periodic
    frames in a burst. Nothing is refused or dropped."""
    node, identity = enrolled
    meter = Meter(identity, EpochJournal(tmp_path))
    inventory = frames.inventory(GpuReport(gpus=(factories.gpu(0),)), ["a/b:1"])

    async def session() -> WebsocketCommunicator:
        socket, challenge = await open_socket()
        await socket.send_json_to(frames.auth(identity, challenge["challenge"]))
        await socket.send_json_to({"type": "heartbeat"})  # sent before the welcome arrives
        assert (await socket.receive_json_from(timeout=5))["type"] == "welcome"
        state = await socket.receive_json_from(timeout=5)
        revision = state["envelope"]["body"]["revision"]
        await socket.send_json_to(frames.metering(meter.sample({})))
        await socket.send_json_to(inventory)
        await socket.send_json_to(frames.sandbox_status(identity, [], full=True))
        await socket.send_json_to(frames.ack(identity, revision, {}, []))
        return socket

    async def scenario():
        for _ in range(5):
            socket = await session()
            assert await socket.receive_nothing(timeout=0.3)
            await socket.disconnect()
        socket = await session()
        for _ in range(12):  # a minute: heartbeat every 5 s, a sample every 10 s
            await socket.send_json_to({"type": "heartbeat"})
        for _ in range(6):
            await socket.send_json_to(frames.metering(meter.sample({})))
        await socket.send_json_to(inventory)
        assert await socket.receive_nothing(timeout=1)
        seen = await database_sync_to_async(lambda: Node.objects.get(pk=node.pk).last_seen_at)()
        await socket.disconnect()
        return seen

    before = time.time()
    seen = async_to_sync(scenario)()
    assert seen is not None and seen.timestamp() >= before - 1
    node.refresh_from_db()
    assert node.images == ["a/b:1"]


def test_an_idle_nodes_metering_sample_is_checked_without_waiting_for_a_database_thread(
    enrolled, no_errors
):
    """A sample naming no peer (an idle node's, every 10 s) has nothing to store: it is verified
    on its connection, not handed to the agents' database threads (with 1,000 idle agents those
    hops were a tenth of the web process's CPU). With every such thread held, a sample signed by
    another key is refused without waiting for them."""
    node, identity = enrolled
    body = wire.MeteringSample(
        node_id=node.node_id,
        boot_id=wire.new_nonce(),
        seq=1,
        sampled_at=int(time.time()),
        peers=(),
    ).to_dict()
    forged = wire.signed_envelope(wire.METERING, body, Identity.generate())
    release = threading.Event()
    started = threading.Semaphore(0)

    def hold() -> None:
        started.release()
        release.wait(timeout=30)

    async def scenario():
        socket = await authenticated(node, identity)
        held = [
            consumers._agent_db_executor.submit(hold) for _ in range(consumers.AGENT_DB_THREADS)
        ]
        try:
            for _ in held:
                assert started.acquire(timeout=10)
            await socket.send_json_to(frames.metering(forged))
            assert "metering sample refused" in await closed_with(socket, wire.CLOSE_BAD_MESSAGE)
        finally:
            release.set()

    async_to_sync(scenario)()
