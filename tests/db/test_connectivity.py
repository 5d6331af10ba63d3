"""Node registration's last steps: the agent's signed CONNECTIVITY report (its handshake with the
gateway's hub; a peer node's once node-to-node peers exist) is stored on the node, newest only,
and shown on the provider's nodes page and in the API's node object."""

from __future__ import annotations

import time

import pytest
from clawnode import connectivity as agent_check
from clawnode import wire
from clawnode.keys import Identity

from marketplace.demo_data import enrol_node
from meshnet.connectivity import ConnectivityRefused, record_connectivity
from meshnet.models import Node
from tests import factories

pytestmark = [pytest.mark.db, pytest.mark.django_db]

NODES = "/api/v1/nodes/"


@pytest.fixture
def provider_client(client, provider):
    client.force_login(provider)
    return client


@pytest.fixture
def enrolled(provider) -> tuple[Node, Identity]:
    return enrol_node(
        provider, hostname="rack-2", gpus=[factories.gpu(0)], observed_ip="203.0.113.41"
    )


def report(identity: Identity, *, hub="reachable", rtt=42, at=None, node_id=None) -> dict:
    body = wire.Connectivity(
        node_id=node_id or identity.node_id,
        checked_at=int(time.time()) if at is None else at,
        hub=hub,
        hub_rtt_ms=rtt if hub == "reachable" else 0,
        detail=agent_check.PEER_PENDING,
    ).to_dict()
    return wire.signed_envelope(wire.CONNECTIVITY, body, identity)


def test_a_report_is_stored_on_its_node(enrolled):
    node, identity = enrolled

    assert record_connectivity(node, report(identity))

    node.refresh_from_db()
    assert (node.hub_path, node.hub_rtt_ms, node.peer_path, node.peer_rtt_ms) == (
        "reachable",
        42,
        "untested",
        None,
    )
    assert node.connectivity_checked_at is not None
    assert "not built yet" in node.connectivity_detail


def test_an_older_or_replayed_report_changes_nothing(enrolled):
    node, identity = enrolled
    now = int(time.time())
    fresh = report(identity, hub="unreachable", at=now)
    assert record_connectivity(node, fresh)

    assert not record_connectivity(node, report(identity, at=now - 60))
    assert not record_connectivity(node, fresh)

    node.refresh_from_db()
    assert (node.hub_path, node.hub_rtt_ms) == ("unreachable", None)


@pytest.mark.parametrize(
    "forge",
    [
        lambda identity, node: report(Identity.generate(), node_id=node.node_id),  # not its key
        lambda identity, node: report(identity, node_id="nd_" + "0" * 32),  # another node
        lambda identity, node: report(identity, at=int(time.time()) - 3600),  # stale
        lambda identity, node: wire.signed_envelope(  # signed as another kind
            wire.SANDBOX_STATUS, report(identity)["body"], identity
        ),
    ],
)
def test_a_forged_or_stale_report_is_refused_and_nothing_is_written(enrolled, forge):
    node, identity = enrolled

    with pytest.raises(ConnectivityRefused):
        record_connectivity(node, forge(identity, node))

    node.refresh_from_db()
    assert node.connectivity_checked_at is None and node.hub_path == ""


def test_the_api_node_object_and_the_nodes_page_show_the_check(
    enrolled, provider_api, provider_client
):
    node, identity = enrolled
    before = provider_api.get(f"{NODES}{node.pk}/").json()["connectivity"]
    assert before["checked_at"] is None and before["hub"] == ""
    assert "not reported yet" in provider_client.get("/provider/nodes/").content.decode()

    record_connectivity(node, report(identity, rtt=37))

    body = provider_api.get(f"{NODES}{node.pk}/").json()["connectivity"]
    assert {k: body[k] for k in ("hub", "hub_rtt_ms", "peer", "peer_node_id", "peer_rtt_ms")} == {
        "hub": "reachable",
        "hub_rtt_ms": 37,
        "peer": "untested",
        "peer_node_id": "",
        "peer_rtt_ms": None,
    }
    assert body["checked_at"] and "not built yet" in body["detail"]
    page = provider_client.get("/provider/nodes/").content.decode()
    assert 'hub <span class="path path-reachable">reachable</span> (37 ms)' in page
    assert 'peer node <span class="path path-untested">untested</span>' in page


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_the_agents_socket_names_the_frame_in_its_welcome_and_stores_it(settings, enrolled):
    from asgiref.sync import async_to_sync
    from channels.testing import WebsocketCommunicator
    from clawnode import frames

    from config.asgi import application
    from meshnet import agent_guard

    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    agent_guard.reset()
    node, identity = enrolled

    async def session() -> dict:
        socket = WebsocketCommunicator(application, "/ws/agent/")
        socket.scope["client"] = ("198.51.100.21", 40000)
        connected, _ = await socket.connect()
        assert connected
        challenge = await socket.receive_json_from(timeout=5)
        await socket.send_json_to(frames.auth(identity, challenge["challenge"]))
        welcome = await socket.receive_json_from(timeout=5)
        assert (await socket.receive_json_from(timeout=5))["type"] == "desired_state"
        result = agent_check.Result(hub="reachable", hub_rtt_ms=12)
        await socket.send_json_to(agent_check.frame(identity, result))
        # A forged one closes the socket as a bad message, like any forged signed frame.
        await socket.send_json_to(
            {"type": "connectivity", "envelope": report(Identity.generate(), node_id=node.node_id)}
        )
        assert (await socket.receive_json_from(timeout=5))["type"] == "error"
        assert await socket.receive_output(timeout=5) == {
            "type": "websocket.close",
            "code": wire.CLOSE_BAD_MESSAGE,
        }
        await socket.disconnect()
        return welcome

    welcome = async_to_sync(session)()

    assert welcome["type"] == "welcome" and "connectivity" in welcome["accepts"]
    node.refresh_from_db()
    assert (node.hub_path, node.hub_rtt_ms) == ("reachable", 12)
    agent_guard.reset()
