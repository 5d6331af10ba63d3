"""Scaling out: two web (uvicorn) and two worker (Celery) processes on one database and one
Redis work as one gateway. An agent connected to web A gets the signed desired state that an
order placed through web B causes (the worker that provisions it and the web process that
holds the agent's socket meet only through Redis' channel layer), and its ack, sent to web A,
moves the order to running."""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request
from types import SimpleNamespace

import pytest
import websockets
from clawnode import wire

from marketplace import ledger
from marketplace.listings import create_listing
from marketplace.models import Order
from marketplace.tokens import issue_api_token
from tests.factories import wg_public_key
from tests.integration.conftest import BIN, free_port, wait_until
from tests.integration.test_agent_channel import (
    authenticate,
    enrol,
    gateway_key,
    recv_type,
    ws_url,
)
from tests.integration.test_order_provisioning import call

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


def second_web_and_worker(gateway) -> SimpleNamespace:
    """Web B and worker B beside the fixture's web A and worker A, on the same database,
    Redis database and channel prefix (gateway.env)."""
    port = free_port()
    gateway.start(
        "web-b",
        [str(BIN / "uvicorn"), "config.asgi:application", "--host", "127.0.0.1", "--port",
         str(port), "--log-level", "warning"],
    )  # fmt: skip
    gateway.start(
        "worker-b",
        [str(BIN / "celery"), "-A", "config", "worker", "-l", "info", "--concurrency", "1",
         "--without-gossip", "--without-mingle", "--hostname", f"test-b-{os.getpid()}@%h"],
    )  # fmt: skip
    web_b = SimpleNamespace(base_url=f"http://127.0.0.1:{port}")

    def up() -> bool:
        try:
            with urllib.request.urlopen(web_b.base_url + "/healthz/", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    wait_until(up, timeout=30, message="web B to answer /healthz/")
    return web_b


def test_an_agent_on_web_a_gets_the_push_an_order_on_web_b_causes(gateway, buyer, provider):
    web_b = second_web_and_worker(gateway)
    assert web_b.base_url != gateway.base_url
    identity, node = enrol(provider)
    listing = create_listing(
        provider, node=node, gpu_count=2, price_per_gpu_hour=400_000, price_per_gib=10_000
    )
    ledger.grant_credits(buyer, 100_000_000)
    token = issue_api_token(buyer)
    buyer_key = wg_public_key()

    async def agent_on_web_a() -> int:
        async with websockets.connect(ws_url(gateway)) as ws:
            await authenticate(ws, identity)
            await recv_type(ws, "welcome")
            first = await recv_type(ws, "desired_state")
            assert (
                wire.open_envelope(first["envelope"], gateway_key(), wire.DESIRED_STATE)["peers"]
                == []
            )
            order = {"listing": listing.pk, "gpu_count": 1, "hours": 1}
            order["wireguard_public_key"] = buyer_key
            status, body = await asyncio.to_thread(
                call, web_b, "POST", "/api/v1/orders/", token, order
            )
            assert status == 201, body
            pushed = await recv_type(ws, "desired_state", timeout=30)
            state = wire.open_envelope(pushed["envelope"], gateway_key(), wire.DESIRED_STATE)
            assert [p["public_key"] for p in state["peers"]] == [buyer_key]
            ack = wire.Ack(
                node_id=identity.node_id,
                revision=state["revision"],
                results=(wire.PeerResult(public_key=buyer_key, ok=True),),
                timestamp=int(time.time()),
            ).to_dict()
            envelope = wire.signed_envelope(wire.ACK, ack, identity)
            await ws.send(json.dumps({"type": "ack", "envelope": envelope}))
            return json.loads(body)["id"]

    order_id = asyncio.run(agent_on_web_a())
    wait_until(
        lambda: Order.objects.filter(pk=order_id, state="running").exists(),
        timeout=20,
        message="the ack on web A to move the order placed on web B to running",
    )
    # Both web processes and both workers lived through it.
    assert all(proc.poll() is None for proc in gateway.processes.values()), gateway.logs()
