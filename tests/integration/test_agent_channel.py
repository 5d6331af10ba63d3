"""The agent channel over a real websocket on the real ASGI server, with Redis as channel layer
and a real Celery worker pushing desired state: auth, signed state, acks moving orders."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import websockets
from clawnode import wire
from clawnode.keys import Identity

from marketplace import ledger
from marketplace.listings import create_listing
from marketplace.models import Order
from marketplace.tokens import issue_api_token
from meshnet.enrolment import create_enrollment_token, enroll_node
from tests.factories import enroll_request, gpu, wg_public_key
from tests.integration.conftest import wait_until
from tests.integration.test_order_provisioning import call

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


def enrol(owner) -> tuple[Identity, object]:
    identity = Identity.generate()
    issued = create_enrollment_token(owner)
    node = enroll_node(
        enroll_request(identity, issued.token, gpus=[gpu(0), gpu(1)]), observed_ip="203.0.113.7"
    ).node
    return identity, node


def ws_url(gateway) -> str:
    return gateway.base_url.replace("http://", "ws://") + "/ws/agent/"


async def authenticate(ws, identity: Identity) -> dict:
    challenge = json.loads(await ws.recv())
    assert challenge["type"] == "challenge"
    body = wire.AgentAuth(
        node_id=identity.node_id, challenge=challenge["challenge"], timestamp=int(time.time())
    ).to_dict()
    await ws.send(
        json.dumps(
            {
                "type": "auth",
                "envelope": wire.signed_envelope(wire.AGENT_AUTH, body, identity),
            }
        )
    )
    return challenge


async def recv_type(ws, kind: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), deadline - time.monotonic()))
        if frame["type"] == kind:
            return frame


def gateway_key() -> bytes:
    from meshnet.gateway_key import gateway_identity

    return gateway_identity().public_key


def test_agent_receives_signed_state_and_its_ack_starts_the_order(gateway, buyer, provider):
    identity, node = enrol(provider)
    listing = create_listing(
        provider, node=node, gpu_count=2, price_per_gpu_hour=400_000, price_per_gib=10_000
    )
    ledger.grant_credits(buyer, 100_000_000)
    token = issue_api_token(buyer)
    buyer_key = wg_public_key()

    async def agent():
        async with websockets.connect(ws_url(gateway)) as ws:
            await authenticate(ws, identity)
            welcome = await recv_type(ws, "welcome")
            assert welcome["name"] == node.name
            first = await recv_type(ws, "desired_state")
            state = wire.open_envelope(first["envelope"], gateway_key(), wire.DESIRED_STATE)
            assert state["peers"] == []

            order = {"listing": listing.pk, "gpu_count": 1, "hours": 1}
            order["wireguard_public_key"] = buyer_key
            status, body = await asyncio.to_thread(
                call, gateway, "POST", "/api/v1/orders/", token, order
            )
            assert status == 201, body
            pushed = await recv_type(ws, "desired_state")
            state = wire.open_envelope(pushed["envelope"], gateway_key(), wire.DESIRED_STATE)
            assert [p["public_key"] for p in state["peers"]] == [buyer_key]
            ack = wire.Ack(
                node_id=identity.node_id,
                revision=state["revision"],
                results=(wire.PeerResult(public_key=buyer_key, ok=True),),
                timestamp=int(time.time()),
            ).to_dict()
            await ws.send(
                json.dumps(
                    {
                        "type": "ack",
                        "envelope": wire.signed_envelope(wire.ACK, ack, identity),
                    }
                )
            )
            return json.loads(body)["id"]

    order_id = asyncio.run(agent())
    order = wait_until(
        lambda: Order.objects.filter(pk=order_id, state="running").first(),
        timeout=20,
        message="the ack to move the order to running",
    )
    assert order.running_since is not None
    node.refresh_from_db()
    assert node.acked_revision == node.desired_revision
    assert node.last_seen_at is not None


def test_replayed_auth_from_another_connection_is_refused(gateway, provider):
    identity, _node = enrol(provider)

    async def scenario():
        async with websockets.connect(ws_url(gateway)) as first:
            challenge = json.loads(await first.recv())
            body = wire.AgentAuth(
                node_id=identity.node_id,
                challenge=challenge["challenge"],
                timestamp=int(time.time()),
            ).to_dict()
            recorded = {
                "type": "auth",
                "envelope": wire.signed_envelope(wire.AGENT_AUTH, body, identity),
            }
            await first.send(json.dumps(recorded))
            await recv_type(first, "welcome")
        # An eavesdropper replays the recorded answer on a new connection.
        async with websockets.connect(ws_url(gateway)) as second:
            await second.recv()  # its own, different challenge
            await second.send(json.dumps(recorded))
            error = await recv_type(second, "error")
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await second.recv()
            return error, closed.value.rcvd.code

    error, code = asyncio.run(scenario())
    assert "challenge" in error["detail"]
    assert code == wire.CLOSE_AUTH_FAILED


def test_auth_signed_by_another_key_is_refused(gateway, provider):
    identity, _node = enrol(provider)
    impostor = Identity.generate()

    async def scenario():
        async with websockets.connect(ws_url(gateway)) as ws:
            challenge = json.loads(await ws.recv())
            body = wire.AgentAuth(
                node_id=identity.node_id,
                challenge=challenge["challenge"],
                timestamp=int(time.time()),
            ).to_dict()
            forged = wire.signed_envelope(wire.AGENT_AUTH, body, impostor)
            await ws.send(json.dumps({"type": "auth", "envelope": forged}))
            error = await recv_type(ws, "error")
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            return error, closed.value.rcvd.code

    error, code = asyncio.run(scenario())
    assert "signature" in error["detail"]
    assert code == wire.CLOSE_AUTH_FAILED


def test_a_frame_that_is_not_json_closes_the_connection_with_a_code(gateway, provider):
    async def scenario():
        async with websockets.connect(ws_url(gateway)) as ws:
            await ws.recv()  # challenge
            await ws.send("this is not json")
            error = await recv_type(ws, "error")
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            return error, closed.value.rcvd.code

    error, code = asyncio.run(scenario())
    assert "JSON" in error["detail"]
    assert code == wire.CLOSE_BAD_MESSAGE
