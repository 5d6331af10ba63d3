"""Pushes to many agents as one message per web process (meshnet.fanout, issue 14): each
agent connection gets its own node's state from a batched push, and none is lost or sent to
another node; a connection that closed gets nothing. Driven through config.asgi's
application with an in-memory channel layer."""

from __future__ import annotations

import asyncio
import time

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from clawnode import wire

from marketplace.demo_data import enrol_node
from meshnet import fanout, tasks
from meshnet.gateway_key import gateway_identity
from meshnet.models import Node
from tests import factories

pytestmark = [pytest.mark.db, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def in_memory(settings):
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    settings.MOLT_HEARTBEAT_FLUSH_SECONDS = 3600
    return settings


async def _connect(node, identity) -> WebsocketCommunicator:
    from config.asgi import application

    socket = WebsocketCommunicator(application, "/ws/agent/")
    connected, _ = await socket.connect()
    assert connected
    challenge = await socket.receive_json_from(timeout=5)
    body = wire.AgentAuth(
        node_id=node.node_id, challenge=challenge["challenge"], timestamp=int(time.time())
    ).to_dict()
    await socket.send_json_to(
        {"type": "auth", "envelope": wire.signed_envelope(wire.AGENT_AUTH, body, identity)}
    )
    assert (await socket.receive_json_from(timeout=5))["type"] == "welcome"
    assert (await socket.receive_json_from(timeout=5))["type"] == "desired_state"
    return socket


def _revision(frame) -> tuple[str, int]:
    body = wire.open_envelope(frame["envelope"], gateway_identity().public_key, wire.DESIRED_STATE)
    return body["node_id"], body["revision"]


def test_a_batched_push_reaches_each_agent_with_its_own_state(provider, in_memory, monkeypatch):
    agents = [
        enrol_node(provider, hostname=f"f{i}", gpus=[factories.gpu(0)], observed_ip="203.0.113.9")
        for i in range(5)
    ]
    absent = agents.pop()  # enrolled, not connected: its state goes nowhere
    monkeypatch.setattr(tasks, "PUSH_CHUNK", 2)  # three messages for five nodes
    Node.objects.update(desired_revision=3)
    layer = get_channel_layer()
    group_sends = []
    real = layer.group_send

    async def counting(group, message):
        group_sends.append(group)
        await real(group, message)

    monkeypatch.setattr(layer, "group_send", counting)

    async def scenario():
        sockets = [await _connect(node, identity) for node, identity in agents]
        gone = sockets.pop()  # closes before the push
        await gone.disconnect()
        pks = [node.pk for node, _ in agents] + [absent[0].pk]
        pushed = await database_sync_to_async(tasks.push_desired_states)(pks)
        got = [_revision(await s.receive_json_from(timeout=5)) for s in sockets]
        nothing_more = [await s.receive_nothing(timeout=0.2) for s in sockets]
        for s in sockets:
            await s.disconnect()
        return pushed, got, nothing_more

    pushed, got, nothing_more = async_to_sync(scenario)()
    assert pushed == 5
    assert got == [(node.node_id, 3) for node, _ in agents[:3]]
    assert nothing_more == [True, True, True]
    # Three messages for five states, none to a node's own group (owners' pages get theirs).
    assert group_sends.count(fanout.AGENTS_GROUP) == 3
    assert not [group for group in group_sends if group.startswith("node.")]


def test_the_process_leaves_the_group_when_its_last_agent_goes(provider, in_memory):
    node, identity = enrol_node(
        provider, hostname="f", gpus=[factories.gpu(0)], observed_ip="203.0.113.9"
    )

    async def scenario():
        socket = await _connect(node, identity)
        pushes = fanout.fanout(get_channel_layer())
        held = dict(pushes.sockets)
        await socket.disconnect()
        await asyncio.sleep(0.1)
        return list(held), pushes.sockets, get_channel_layer().groups.get(fanout.AGENTS_GROUP)

    held, after, members = async_to_sync(scenario)()
    assert held == [node.node_id]
    assert after == {} and not members


# postgres too: the integration tier needs PostgreSQL, so the SQLite pass (`db and not
# postgres`) must not select it (a skip there fails CI).
@pytest.mark.integration
@pytest.mark.postgres
def test_through_redis_a_push_arrives_while_the_processes_connections_wait_on_theirs(settings):
    """channels_redis receives all of a process's channels of one prefix through one Redis
    key, one blocking read at a time: the fanout's channel must be one of them, or its
    messages wait behind every connection's read (5 s each) before any agent gets a push."""
    import uuid

    from channels_redis.core import RedisChannelLayer

    config = {**settings.CHANNEL_LAYERS["default"]["CONFIG"], "prefix": f"t-{uuid.uuid4().hex}"}

    class Socket:
        def __init__(self) -> None:
            self.got: list[dict] = []

        async def desired_state(self, event) -> None:
            self.got.append(event["envelope"])

    async def scenario():
        web, sender = RedisChannelLayer(**config), RedisChannelLayer(**config)
        waiting = [asyncio.ensure_future(web.receive(await web.new_channel())) for _ in range(20)]
        socket = Socket()
        pushes = fanout.Fanout(web)
        pushes.join("node-a", socket)
        await asyncio.wait_for(pushes.joined.wait(), 5)
        states = {"node-a": {"revision": 1}, "node-b": {"revision": 1}}
        await sender.group_send(fanout.AGENTS_GROUP, fanout.states_message(states))
        deadline = time.monotonic() + 4
        while not socket.got and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        pushes.leave("node-a", socket)
        for receiving in waiting:
            receiving.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        await web.flush()
        return socket.got

    assert async_to_sync(scenario)() == [{"revision": 1}]


def test_a_push_reads_the_key_certificates_once_not_once_per_agent(settings, tmp_path, monkeypatch):
    """The chain goes beside every state of a push after a rotation, read (a stat of its
    file) once for the message, not once per connection it reaches."""
    from meshnet import gateway_key
    from meshnet.consumers import AgentConsumer

    settings.MOLT_STATE_DIR = tmp_path / "gateway-state"  # rotating the session's key is not ours
    gateway_key.rotate_gateway_key()
    chain = gateway_key.key_certificates()
    certs_path = gateway_key._certs_path()
    reads = []
    real_version = gateway_key._version

    def counting(path):
        if path == certs_path:
            reads.append(path)
        return real_version(path)

    monkeypatch.setattr(gateway_key, "_version", counting)

    class Recording(AgentConsumer):
        def __init__(self, node_id: str) -> None:
            self.node = Node(node_id=node_id)
            self.sent: list[dict] = []

        async def send_json(self, content, close=False) -> None:
            self.sent.append(content)

    async def scenario():
        pushes = fanout.Fanout(layer=None)
        sockets = [Recording(f"node-{i}") for i in range(3)]
        for socket in sockets:
            pushes.sockets.setdefault(socket.node.node_id, set()).add(socket)
        states = {s.node.node_id: {"body": {"node_id": s.node.node_id}} for s in sockets}
        delivered = pushes.deliver(fanout.states_message(states))
        await asyncio.gather(*pushes._sends)
        return delivered, [socket.sent for socket in sockets]

    delivered, sent = async_to_sync(scenario)()
    assert delivered == 3
    assert [[frame["key_certs"] for frame in frames] for frames in sent] == [[chain]] * 3
    assert len(reads) == 1


def test_the_states_of_agents_connecting_together_are_read_together(provider, monkeypatch):
    """A gateway restart brings every agent back at once: their states on connect are read
    in one batch (a thread hop and a few queries), each agent its own."""
    from meshnet import consumers

    agents = [
        enrol_node(provider, hostname=f"c{i}", gpus=[factories.gpu(0)], observed_ip="203.0.113.9")
        for i in range(3)
    ]
    Node.objects.update(desired_revision=4)
    reads = []
    real = consumers._signed_states

    def counting(nodes):
        reads.append(sorted(node.node_id for node in nodes))
        return real(nodes)

    monkeypatch.setattr(consumers, "_signed_states", counting)
    nodes = [Node.objects.get(pk=node.pk) for node, _ in agents]

    async def scenario():
        batcher = consumers.ConnectStates()
        return await asyncio.gather(*(batcher.read(node) for node in nodes))

    got = async_to_sync(scenario)()
    assert reads == [sorted(node.node_id for node in nodes)]
    for node, (envelope, names) in zip(nodes, got, strict=True):
        assert _revision({"envelope": envelope}) == (node.node_id, 4)
        assert (names["body"]["node_id"], names["body"]["revision"]) == (node.node_id, 4)
